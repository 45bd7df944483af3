"""Frotcom batch → validated positions → Cartrack events. Pure functions only.

Everything here is decided without I/O so it can be tested with tables: what counts
as a valid position, why an invalid one is quarantined, which event type a position
gets, and exactly which keys an event carries (the spec's keys, no others).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relay.timeutil import format_ms, parse_instant

MAX_VEHICLE_ID_LENGTH = 128
# What the outbox keeps verbatim (a position's source, quarantined input) is encoded with
# the json module, which recurses: input nested deeper than any real Frotcom batch is a
# 400 here, not a RecursionError (a 500) in the storage layer. The parser may accept ~1000.
MAX_NESTING = 64
_POSITION_FIELDS = frozenset(
    {"Timestamp", "Latitude", "Longitude", "Speed", "Direction", "Ignition", "Odometer"}
)


class BadRequest(ValueError):
    """The request body as a whole is unusable: answered 400 with this detail."""


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# measured 0.96 against 0.23 us a position, on the event loop every request shares.
@dataclass(slots=True)
class Position:
    vehicle_id: str
    ts_ms: int
    event_ts: str  # ts_ms as canonical text, kept because formatting costs more than an insert
    latitude: float
    longitude: float
    speed: float
    ignition: bool
    odometer: float | None
    raw: Any  # the position as decoded (None when ``source`` came with it)
    # Its JSON text as Frotcom sent it, when the body was decoded with the texts kept
    # (relay/frotcom.py); otherwise the outbox encodes ``raw``.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input kept verbatim in quarantine, with the reason it could not be used."""

    vehicle_id: str | None
    reason: str
    raw: Any


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    positions: list[Position]
    rejected: list[Rejected]

    @property
    def count(self) -> int:
        """Positions accepted for the outbox (rejected ones not counted)."""
        return len(self.positions)

    @property
    def vehicle_count(self) -> int:
        return len({p.vehicle_id for p in self.positions})


@dataclass(frozen=True, slots=True)
class VehicleState:
    last_ts_ms: int
    ignition: bool


# -- parsing -------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"body is not valid JSON: {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"body is not valid JSON: number {text[:40]} is out of range")
    return value


# Bytes to digits ("0") and everything else (" "): a run of 19 digits marks an integer
# orjson might read as a float (it keeps 64 bits), or a long mantissa.
_DIGIT_RUNS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19


def decode_body(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no numbers that overflow a double."""
    # orjson is strict in the same ways (and ~10x faster on a Frotcom batch); whatever it
    # refuses, and bodies with integers it could not keep exact, go to the standard
    # library below, so every answer and every 400 detail stays exactly as it was.
    if _LONG_NUMBER not in body.translate(_DIGIT_RUNS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python allows
        raise BadRequest(f"body is not valid JSON: {str(exc)[:120]}") from None


def parse_batch(body: Any, now_ms: int, max_future_ms: int) -> ParsedBatch:
    """Split a decoded Frotcom body into valid positions and quarantined input."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with a 'PvtMessages' array")
    messages = body.get("PvtMessages")
    if not isinstance(messages, list):
        raise BadRequest("'PvtMessages' must be an array")
    positions: list[Position] = []
    rejected: list[Rejected] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            rejected.append(Rejected(None, f"PvtMessages[{index}]: not an object", message))
            continue
        vehicle_id, problem = _vehicle_id(message.get("VehicleID"))
        if vehicle_id is None:
            rejected.append(Rejected(None, f"PvtMessages[{index}].VehicleID: {problem}", message))
            continue
        raw_positions = message.get("Positions")
        if not isinstance(raw_positions, list):
            reason = f"PvtMessages[{index}].Positions: missing or not an array"
            rejected.append(Rejected(vehicle_id, reason, message))
            continue
        for raw in raw_positions:
            result = parse_position(vehicle_id, raw, now_ms, max_future_ms)
            if isinstance(result, Position):
                # Only fields beyond the documented ones can hold arrays or objects.
                if not _POSITION_FIELDS.issuperset(raw) and _deeper_than(raw, MAX_NESTING):
                    raise _too_deep(index)
                positions.append(result)
            else:
                rejected.append(result)
    for item in rejected:
        if _deeper_than(item.raw, MAX_NESTING):
            raise _too_deep(None)
    return ParsedBatch(positions, rejected)


def _too_deep(index: int | None) -> BadRequest:
    where = "a message" if index is None else f"PvtMessages[{index}]"
    return BadRequest(f"{where} nests arrays or objects more than {MAX_NESTING} levels deep")


def _deeper_than(value: Any, limit: int) -> bool:
    """True if arrays/objects nest more than ``limit`` levels in ``value`` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth > limit:
            return True
        stack.extend(
            (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
        )
    return False


def plausible_vehicle_id(value: Any) -> str | None:
    """A VehicleID as the relay keeps it (text, stripped), or None if it is not one."""
    return _vehicle_id(value)[0]


def _vehicle_id(value: Any) -> tuple[str | None, str]:
    # Frotcom documents VehicleID as text but may send a JSON number.
    if isinstance(value, bool) or value is None:
        return None, "missing" if value is None else "must be text"
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None, "must be text or an integer"
    value = value.strip()
    if not value:
        return None, "empty"
    if len(value) > MAX_VEHICLE_ID_LENGTH or not value.isprintable():
        return None, f"not a plausible id (printable, at most {MAX_VEHICLE_ID_LENGTH} chars)"
    return value, ""


def _number(raw: dict[str, Any], key: str, lo: float, hi: float | None) -> float | str:
    value = raw.get(key)
    if value is None:
        return f"{key}: missing" if key not in raw else f"{key}: must be a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key}: must be a number"
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond a double's range
        number = math.inf
    if not math.isfinite(number) or number < lo or (hi is not None and number > hi):
        span = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
        shown = repr(value)
        if len(shown) > 40:
            shown = f"{shown[:40]}..."
        return f"{key}: {shown} out of range ({span})"
    return number


_MAX_DOUBLE = sys.float_info.max


def _plain(value: Any, lo: float, hi: float) -> bool:
    # type() rather than isinstance: a bool is an int, and is not a number here.
    return (type(value) is float or type(value) is int) and lo <= value <= hi


def parse_position(
    vehicle_id: str, raw: Any, now_ms: int, max_future_ms: int
) -> Position | Rejected:
    """Validate one position; the first problem found becomes the quarantine reason."""
    # The shape nearly every real position has, checked in one pass; anything else (and
    # every rejection) takes the careful path below, which alone words the reasons.
    # tests/test_mapping.py holds the two paths to the same answers.
    if type(raw) is dict:
        stamp = raw.get("Timestamp")
        latitude = raw.get("Latitude")
        longitude = raw.get("Longitude")
        speed = raw.get("Speed")
        direction = raw.get("Direction")
        ignition = raw.get("Ignition")
        odometer = raw.get("Odometer")
        if (
            type(stamp) is str
            and _plain(latitude, -90.0, 90.0)
            and _plain(longitude, -180.0, 180.0)
            and _plain(speed, 0.0, _MAX_DOUBLE)
            and (direction is None or _plain(direction, 0.0, 360.0))
            and type(ignition) is bool
            and (odometer is None or _plain(odometer, 0.0, _MAX_DOUBLE))
        ):
            try:
                ts_ms, event_ts = parse_instant(stamp)
            except (ValueError, OverflowError):
                pass
            else:
                if ts_ms - now_ms <= max_future_ms:
                    return Position(
                        vehicle_id,
                        ts_ms,
                        event_ts,
                        float(latitude),
                        float(longitude),
                        float(speed),
                        ignition,
                        None if odometer is None else float(odometer),
                        raw,
                    )
    return _parse_position_checked(vehicle_id, raw, now_ms, max_future_ms)


def _parse_position_checked(
    vehicle_id: str, raw: Any, now_ms: int, max_future_ms: int
) -> Position | Rejected:
    if not isinstance(raw, dict):
        return Rejected(vehicle_id, "position: not an object", raw)
    stamp = raw.get("Timestamp")
    if not isinstance(stamp, str):
        return Rejected(vehicle_id, "Timestamp: missing or not text", raw)
    try:
        ts_ms, event_ts = parse_instant(stamp)
    except (ValueError, OverflowError):
        return Rejected(vehicle_id, f"Timestamp: {stamp[:64]!r} is not ISO-8601", raw)
    if ts_ms - now_ms > max_future_ms:
        ahead = (ts_ms - now_ms) // 1000
        return Rejected(
            vehicle_id, f"Timestamp: {ahead}s in the future (limit {max_future_ms // 1000}s)", raw
        )
    checks = (
        ("Latitude", -90.0, 90.0),
        ("Longitude", -180.0, 180.0),
        ("Speed", 0.0, None),
    )
    numbers: list[float] = []
    for key, lo, hi in checks:
        value = _number(raw, key, lo, hi)
        if isinstance(value, str):
            return Rejected(vehicle_id, value, raw)
        numbers.append(value)
    if raw.get("Direction") is not None:
        direction = _number(raw, "Direction", 0.0, 360.0)
        if isinstance(direction, str):
            return Rejected(vehicle_id, direction, raw)
    ignition = raw.get("Ignition")
    if not isinstance(ignition, bool):
        return Rejected(vehicle_id, "Ignition: missing or not true/false", raw)
    odometer: float | None = None
    if raw.get("Odometer") is not None:
        value = _number(raw, "Odometer", 0.0, None)
        if isinstance(value, str):
            return Rejected(vehicle_id, value, raw)
        odometer = value
    latitude, longitude, speed = numbers
    return Position(
        vehicle_id, ts_ms, event_ts, latitude, longitude, speed, ignition, odometer, raw
    )


# -- decisions -----------------------------------------------------------------------


def next_event_type(
    state: VehicleState | None, ts_ms: int, ignition: bool
) -> tuple[str, VehicleState | None]:
    """Event type of one position given its vehicle's state, and the state after it.

    The first position of a vehicle is PERIODIC; a position not newer than the newest
    seen (late or repeated) is PERIODIC and leaves the state alone.
    """
    if state is None:
        return "PERIODIC", VehicleState(ts_ms, ignition)
    if ts_ms <= state.last_ts_ms:
        return "PERIODIC", state
    new_state = VehicleState(ts_ms, ignition)
    if ignition != state.ignition:
        return ("IGNITION_ON" if ignition else "IGNITION_OFF"), new_state
    return "PERIODIC", new_state


def event_types(
    state: VehicleState | None, moments: Sequence[tuple[int, bool]]
) -> tuple[list[str] | None, VehicleState | None]:
    """next_event_type along one vehicle's positions (``(ts_ms, ignition)`` in order).

    Returns the types, or None when every one is PERIODIC (nearly always: ignition
    changes a few times a day), and the state after the last. Runs in the writer's
    transaction, where each allocation per position costs the whole relay.
    """
    types: list[str] | None = None
    changed = False
    if state is None:
        if not moments:
            return None, None
        last_ts, last_ignition = moments[0]
        changed = True
        start = 1
    else:
        last_ts, last_ignition = state.last_ts_ms, state.ignition
        start = 0
    for i in range(start, len(moments)):
        ts_ms, ignition = moments[i]
        if ts_ms <= last_ts:
            continue  # late or repeated: PERIODIC, state unchanged
        if ignition != last_ignition:
            if types is None:
                types = ["PERIODIC"] * len(moments)
            types[i] = "IGNITION_ON" if ignition else "IGNITION_OFF"
        last_ts, last_ignition, changed = ts_ms, ignition, True
    return types, (VehicleState(last_ts, last_ignition) if changed else state)


def provider_event_id(provider: str, vehicle_id: str, ts_ms: int) -> str:
    return event_id(provider, vehicle_id, format_ms(ts_ms))


def event_id(provider: str, vehicle_id: str, event_ts: str) -> str:
    """provider_event_id from the instant's canonical text (formatting it costs)."""
    return f"{provider}:{vehicle_id}:{event_ts}"


def build_event(
    position: Position, event_type: str, provider: str, received_at: str
) -> dict[str, Any]:
    """The Cartrack event for a position, without ``chassis_number``.

    The VIN is added when the event is sent, so a corrected vehicle map applies to
    rows already in the outbox.
    """
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_ts": position.event_ts,
        "source": {
            "provider": provider,
            "device_id": position.vehicle_id,
            "provider_event_id": event_id(provider, position.vehicle_id, position.event_ts),
            "provider_received_ts": received_at,
        },
        "position": {"latitude": position.latitude, "longitude": position.longitude},
    }
    # Cartrack requires speed, ignition and odometer together; Frotcom's PVT data has
    # no odometer, so telemetry goes only with positions that carry one.
    if position.odometer is not None:
        event["telemetry"] = {
            "speed": position.speed,
            "ignition": position.ignition,
            "odometer": position.odometer,
        }
    return event


@functools.lru_cache(maxsize=4096)
def _vin_json(vin: str) -> str:
    # Once per VIN, not per event: a fleet has a few thousand at most.
    return json.dumps(vin, ensure_ascii=False)


def with_vin(payload: str, vin: str) -> bytes:
    """The request body for a stored payload: chassis_number goes in at send time."""
    if (
        payload[:1] == "{"
        and payload[-1:] == "}"
        and payload[-2:] != "{}"
        and '": ' not in payload
        and '"chassis_number"' not in payload
    ):
        # The stored payload is compact JSON (a valid object: the column's CHECK), so
        # the key goes in as text, where decoding and encoding it again would put it:
        # the same bytes, a tenth of the time (a few us per event on the send path).
        # Anything else (spaced JSON, a chassis_number already there) takes the long way.
        return (payload[:-1] + ',"chassis_number":' + _vin_json(vin) + "}").encode()
    event = json.loads(payload)
    event["chassis_number"] = vin
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
