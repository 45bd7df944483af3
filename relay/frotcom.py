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
"""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
from msgspec import Meta, Raw, Struct

from relay.mapping import ParsedBatch, Position, decode_body, parse_batch, plausible_vehicle_id
from relay.timeutil import parse_instant

__all__ = ["parse_body"]

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


def parse_body(body: bytes, now_ms: int, max_future_ms: int) -> ParsedBatch:
    """``parse_batch(decode_body(body), ...)``, faster for a body of the documented shape.

    Raises ``mapping.BadRequest`` for a body that is unusable as a whole.
    """
    positions = _documented(body, now_ms, max_future_ms)
    if positions is None:
        return parse_batch(decode_body(body), now_ms, max_future_ms)
    return ParsedBatch(positions, [])


def _documented(body: bytes, now_ms: int, max_future_ms: int) -> list[Position] | None:
    """Every position of a body of the documented shape; None for any other body."""
    try:
        messages = _typed.decode(body).PvtMessages
        texts = _texts.decode(body).PvtMessages
    except Exception:
        # Not JSON, not UTF-8, not this shape: the careful path says which.
        return None
    positions: list[Position] = []
    append = positions.append
    for message, raw in zip(messages, texts, strict=True):
        vehicle_id = plausible_vehicle_id(message.VehicleID)
        if vehicle_id is None:
            return None
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
