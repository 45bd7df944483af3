"""A webhook body of Frotcom's documented shape, decoded and checked in one C pass.

Nearly every request Frotcom sends has exactly the shape of SPEC §1: PvtMessages,
each with VehicleID, LicensePlate and Positions, each position with Timestamp,
Latitude, Longitude, Speed, Ignition and optionally Direction and Odometer, every
value in range. msgspec decodes such a body straight into typed structs with the
ranges checked on the way, and a second pass hands back each position's JSON text
as it came (the outbox's ``source``), where ``mapping.parse_batch`` builds a dict
per position, checks each value in Python and encodes the position again.

Anything else (an extra field, a value out of range or of the wrong type, a
timestamp that does not parse or lies in the future, a VehicleID that is not a
plausible id, a body that is not JSON) is left to ``mapping.decode_body`` and
``mapping.parse_batch``, which alone word the reasons for a quarantine or a 400.
So this path only ever accepts what that one would accept, with the same
positions (tests/test_frotcom.py holds the two to the same answers).

Where the package was built with a C compiler, ``relay._rows`` (relay/_rows.c) goes
one step further for such a body: it checks the timestamps without a Python object
per position, and later builds the outbox rows straight from the decoded structs
(``Documented.rows``), so no ``Position`` is made at all. Whatever it cannot do
exactly as the Python code would, it leaves to that code (tests/test_rows.py).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Annotated, Any, cast

import msgspec
from msgspec import Meta, Raw, Struct

from relay.mapping import (
    ParsedBatch,
    Position,
    Rejected,
    decode_body,
    parse_batch,
    plausible_vehicle_id,
)
from relay.timeutil import parse_instant

try:
    from relay import _rows
except ImportError:  # built without a C compiler: the same rows, made in Python
    _rows = None  # type: ignore[assignment]

__all__ = ["Batch", "Documented", "parse_body"]

_MAX_DOUBLE = sys.float_info.max


class _Position(Struct, forbid_unknown_fields=True):
    # float takes JSON integers too, never true/false: mapping._plain's rule.
    Timestamp: str
    Latitude: Annotated[float, Meta(ge=-90.0, le=90.0)]
    Longitude: Annotated[float, Meta(ge=-180.0, le=180.0)]
    Speed: Annotated[float, Meta(ge=0.0, le=_MAX_DOUBLE)]
    Ignition: bool
    Direction: Annotated[float, Meta(ge=0.0, le=360.0)] | None = None
    Odometer: Annotated[float, Meta(ge=0.0, le=_MAX_DOUBLE)] | None = None


class _Message(Struct, forbid_unknown_fields=True):
    VehicleID: str | int
    Positions: list[_Position]
    LicensePlate: str | None = None


class _Body(Struct, forbid_unknown_fields=True):
    PvtMessages: list[_Message]


class _RawMessage(Struct):
    Positions: list[Raw]


class _RawBody(Struct):
    PvtMessages: list[_RawMessage]


_typed = msgspec.json.Decoder(_Body)
_texts = msgspec.json.Decoder(_RawBody)


class Documented:
    """A body of the documented shape, whose rows the compiled hot path can build.

    Holds what msgspec decoded; ``positions`` are made only when something asks for
    them (the outbox asks ``rows`` first, and builds rows from positions only when
    that answers None).
    """

    def __init__(
        self,
        messages: list[_Message],
        texts: list[_RawMessage],
        vehicle_ids: list[str],
        count: int,
        now_ms: int,
        max_future_ms: int,
    ) -> None:
        self._messages = messages
        self._texts = texts
        self._vehicle_ids = vehicle_ids
        self._now_ms = now_ms
        self._max_future_ms = max_future_ms
        self.count = count
        # As ParsedBatch counts them: vehicles with a position (a message may have none).
        self.vehicle_count = len(
            {v for v, m in zip(vehicle_ids, messages, strict=True) if m.Positions}
        )
        self.rejected: list[Rejected] = []  # a documented body has nothing to quarantine

    @functools.cached_property
    def positions(self) -> list[Position]:
        positions = _positions(
            self._messages, self._texts, self._vehicle_ids, self._now_ms, self._max_future_ms
        )
        if positions is None:  # the compiled scan took a body the Python code would not
            raise AssertionError("relay._rows.scan and frotcom._positions disagree")
        return positions

    def rows(
        self, provider: str, received_at: str, vehicles: Mapping[str, str]
    ) -> list[VehicleRowsTuple] | None:
        """Each vehicle's rows as BatchJob builds them, or None: build them from positions."""
        if _rows is None:
            return None
        order = {v: i for i, v in enumerate(sorted(set(self._vehicle_ids)))}
        return _rows.rows(
            self._messages,
            self._texts,
            self._vehicle_ids,
            [order[v] for v in self._vehicle_ids],
            provider,
            received_at,
            vehicles,
        )


def hot_path() -> str:
    """Which rows builder runs, for the log: "compiled" (relay/_rows.c) or "python"."""
    return "python" if _rows is None else "compiled"


Batch = ParsedBatch | Documented
"""What the webhook hands the outbox: the careful path's batch or a documented body."""

# (vehicle_id, held, moments, rows, values, steady): relay.outbox.batch._VehicleRows.
VehicleRowsTuple = tuple[str, bool, list[tuple[int, bool]], list[tuple[Any, ...]], list[Any], bool]


def parse_body(body: bytes, now_ms: int, max_future_ms: int) -> Batch:
    """``parse_batch(decode_body(body), ...)``, faster for a body of the documented shape.

    Raises ``mapping.BadRequest`` for a body that is unusable as a whole.
    """
    try:
        messages = _typed.decode(body).PvtMessages
        texts = _texts.decode(body).PvtMessages
    except Exception:
        # Not JSON, not UTF-8, not this shape: the careful path says which.
        return parse_batch(decode_body(body), now_ms, max_future_ms)
    vehicle_ids = [plausible_vehicle_id(m.VehicleID) for m in messages]
    if None not in vehicle_ids:
        ids = cast(list[str], vehicle_ids)
        if _rows is not None:
            count = _rows.scan(messages, now_ms, max_future_ms)
            if count is not None:
                return Documented(messages, texts, ids, count, now_ms, max_future_ms)
        positions = _positions(messages, texts, ids, now_ms, max_future_ms)
        if positions is not None:
            return ParsedBatch(positions, [])
    return parse_batch(decode_body(body), now_ms, max_future_ms)


def _positions(
    messages: list[_Message],
    texts: list[_RawMessage],
    vehicle_ids: list[str],
    now_ms: int,
    max_future_ms: int,
) -> list[Position] | None:
    """Every position of a documented body; None if a timestamp does not pass."""
    positions: list[Position] = []
    append = positions.append
    for message, raw, vehicle_id in zip(messages, texts, vehicle_ids, strict=True):
        for p, text in zip(message.Positions, raw.Positions, strict=True):
            try:
                ts_ms, event_ts = parse_instant(p.Timestamp)
            except (ValueError, OverflowError):
                return None
            if ts_ms - now_ms > max_future_ms:
                return None
            append(
                Position(
                    vehicle_id,
                    ts_ms,
                    event_ts,
                    p.Latitude,
                    p.Longitude,
                    p.Speed,
                    p.Ignition,
                    p.Odometer,
                    None,
                    bytes(text).decode(),
                )
            )
    return positions
