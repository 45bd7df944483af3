"""Frotcom body -> positions/quarantine -> Cartrack events: the pure rules, as tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.devtools.fake_cartrack import validate_event
from relay.mapping import (
    BadRequest,
    Position,
    Rejected,
    VehicleState,
    build_event,
    decode_body,
    event_types,
    next_event_type,
    parse_batch,
    parse_position,
    with_vin,
)
from relay.mapping import _parse_position_checked as parse_position_checked
from relay.timeutil import parse_timestamp

NOW_MS = parse_timestamp("2023-10-25T16:30:00.000Z")
MAX_FUTURE_MS = 86_400_000
VID = "9876543"
VIN = "WDB9634031L123456"
DROP = object()  # marks a key to remove from the valid position


def raw(**changes: Any) -> dict[str, Any]:
    """A valid Frotcom position with some keys changed (or removed with DROP)."""
    position: dict[str, Any] = {
        "Timestamp": "2023-10-25T16:29:31.087Z",
        "Latitude": 41.40338,
        "Longitude": 2.17803,
        "Speed": 45.0,
        "Direction": 20.0,
        "Ignition": True,
    }
    for key, value in changes.items():
        if value is DROP:
            position.pop(key, None)
        else:
            position[key] = value
    return position


def parse(position: Any) -> Position | Rejected:
    return parse_position(VID, position, NOW_MS, MAX_FUTURE_MS)


# For each field: values on, just inside and just outside its bounds, in every JSON type.
def _around(*bounds: float) -> st.SearchStrategy[Any]:
    near = [b + d for b in bounds for d in (-1e-9, 0.0, 1e-9)]
    return st.one_of(
        st.sampled_from([*near, *(int(b) for b in bounds), -0.0, 1e308, 10**400, DROP]),
        st.sampled_from([None, True, False, "1", [1], {"a": 1}]),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-400, max_value=400),
        st.integers(min_value=-400, max_value=400),
    )


_FIELDS = {
    "Timestamp": st.one_of(
        st.sampled_from(
            [
                "2023-10-25T16:29:31.087Z",  # canonical
                "2023-10-25T16:29:31Z",
                "2023-10-25T18:29:31.087+02:00",
                "2023-10-25T16:29:31.087z",
                "2023-02-29T16:29:31.000Z",  # canonical in shape, not a date
                "0000-01-01T00:00:00.000Z",
                "2023-10-27T16:29:31.000Z",  # beyond max_future
                "2023-10-26T16:30:00.000Z",  # at the limit exactly
                "2023-10-26T16:30:00.001Z",  # 1 ms past it
                DROP,
            ]
        ),
        _around(0),
    ),
    "Latitude": _around(-90, 90),
    "Longitude": _around(-180, 180),
    "Speed": _around(0),
    "Direction": _around(0, 360),
    "Ignition": st.sampled_from([True, False, None, 1, 0, "true", DROP]),
    "Odometer": _around(0),
}


@settings(max_examples=500, derandomize=True, database=None)
@given(st.fixed_dictionaries({}, optional=_FIELDS))
@example({"Odometer": 12.5})
def test_fast_path_answers_exactly_like_the_checked_path(changes: dict[str, Any]) -> None:
    position = raw(**changes)
    assert parse(position) == parse_position_checked(VID, position, NOW_MS, MAX_FUTURE_MS)


def at(text: str) -> int:
    return parse_timestamp(text)


# -- parse_position --------------------------------------------------------------------


def test_valid_position_is_parsed() -> None:
    source = raw()
    result = parse(source)
    assert result == Position(
        vehicle_id=VID,
        ts_ms=at("2023-10-25T16:29:31.087Z"),
        event_ts="2023-10-25T16:29:31.087Z",
        latitude=41.40338,
        longitude=2.17803,
        speed=45.0,
        ignition=True,
        odometer=None,
        raw=source,
    )
    assert result.event_ts == "2023-10-25T16:29:31.087Z"


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"Latitude": -90}, "latitude", -90.0),
        ({"Latitude": 90.0}, "latitude", 90.0),
        ({"Latitude": 0}, "latitude", 0.0),
        ({"Longitude": -180}, "longitude", -180.0),
        ({"Longitude": 180.0}, "longitude", 180.0),
        ({"Speed": 0}, "speed", 0.0),
        ({"Speed": 45}, "speed", 45.0),
        ({"Speed": 512.5}, "speed", 512.5),
        ({"Ignition": False}, "ignition", False),
        ({"Direction": DROP}, "speed", 45.0),
        ({"Direction": None}, "speed", 45.0),
        ({"Direction": 0}, "speed", 45.0),
        ({"Direction": 360}, "speed", 45.0),
        ({"Odometer": DROP}, "odometer", None),
        ({"Odometer": None}, "odometer", None),
        ({"Odometer": 0}, "odometer", 0.0),
        ({"Odometer": 45231.4}, "odometer", 45231.4),
        # unknown fields Frotcom may add do not matter
        ({"Altitude": 15, "Driver": {"Name": "Zé"}, "Tags": [1, None]}, "speed", 45.0),
        # a timestamp slightly ahead is accepted (held until due by the outbox)
        ({"Timestamp": "2023-10-25T17:30:00Z"}, "ts_ms", at("2023-10-25T17:30:00Z")),
        # exactly at the bound is still accepted
        ({"Timestamp": "2023-10-26T16:30:00.000Z"}, "ts_ms", NOW_MS + MAX_FUTURE_MS),
        # any age is accepted (Frotcom resends old data)
        ({"Timestamp": "2001-01-01T00:00:00Z"}, "ts_ms", at("2001-01-01T00:00:00Z")),
        ({"Timestamp": "2023-10-25T18:29:31.087+02:00"}, "ts_ms", at("2023-10-25T16:29:31.087Z")),
    ],
)
def test_accepted_values(changes: dict[str, Any], field: str, expected: Any) -> None:
    result = parse(raw(**changes))
    assert isinstance(result, Position), result
    assert getattr(result, field) == expected
    assert type(getattr(result, field)) is type(expected)


@pytest.mark.parametrize(
    ("position", "reason"),
    [
        ([], "position: not an object"),
        ("x", "position: not an object"),
        (None, "position: not an object"),
        (7, "position: not an object"),
        (raw(Timestamp=DROP), "Timestamp: missing or not text"),
        (raw(Timestamp=None), "Timestamp: missing or not text"),
        (raw(Timestamp=1698251371087), "Timestamp: missing or not text"),
        (raw(Timestamp="yesterday"), "Timestamp: 'yesterday' is not ISO-8601"),
        (
            raw(Timestamp="2023-W43-3T16:29:31Z"),
            "Timestamp: '2023-W43-3T16:29:31Z' is not ISO-8601",
        ),
        (
            raw(Timestamp="2023-02-30T00:00:00Z"),
            "Timestamp: '2023-02-30T00:00:00Z' is not ISO-8601",
        ),
        # one millisecond beyond frotcom.max_future_seconds
        (
            raw(Timestamp="2023-10-26T16:30:00.001Z"),
            "Timestamp: 86400s in the future (limit 86400s)",
        ),
        (
            raw(Timestamp="2033-10-25T16:30:00Z"),
            "Timestamp: 315619200s in the future (limit 86400s)",
        ),
        (raw(Latitude=DROP), "Latitude: missing"),
        (raw(Latitude=None), "Latitude: must be a number"),
        (raw(Latitude="41.4"), "Latitude: must be a number"),
        (raw(Latitude=True), "Latitude: must be a number"),
        (raw(Latitude=[41.4]), "Latitude: must be a number"),
        (raw(Latitude=-90.0001), "Latitude: -90.0001 out of range (-90..90)"),
        (raw(Latitude=90.0001), "Latitude: 90.0001 out of range (-90..90)"),
        (
            raw(Latitude=10**400),
            "Latitude: 1000000000000000000000000000000000000000... out of range (-90..90)",
        ),
        (raw(Longitude=DROP), "Longitude: missing"),
        (raw(Longitude=False), "Longitude: must be a number"),
        (raw(Longitude=-180.0001), "Longitude: -180.0001 out of range (-180..180)"),
        (raw(Longitude=181), "Longitude: 181 out of range (-180..180)"),
        (raw(Speed=DROP), "Speed: missing"),
        (raw(Speed=None), "Speed: must be a number"),
        (raw(Speed="45"), "Speed: must be a number"),
        (raw(Speed=-0.1), "Speed: -0.1 out of range (>= 0)"),
        (
            raw(Speed=-(10**400)),
            "Speed: -100000000000000000000000000000000000000... out of range (>= 0)",
        ),
        (raw(Direction=-1), "Direction: -1 out of range (0..360)"),
        (raw(Direction=360.5), "Direction: 360.5 out of range (0..360)"),
        (raw(Direction="N"), "Direction: must be a number"),
        (raw(Direction=True), "Direction: must be a number"),
        (raw(Ignition=DROP), "Ignition: missing or not true/false"),
        (raw(Ignition=None), "Ignition: missing or not true/false"),
        (raw(Ignition=1), "Ignition: missing or not true/false"),
        (raw(Ignition=0), "Ignition: missing or not true/false"),
        (raw(Ignition="true"), "Ignition: missing or not true/false"),
        (raw(Odometer=-1), "Odometer: -1 out of range (>= 0)"),
        (raw(Odometer="45231.4"), "Odometer: must be a number"),
        (raw(Odometer=True), "Odometer: must be a number"),
    ],
)
def test_rejected_positions_carry_reason_and_raw(position: Any, reason: str) -> None:
    assert parse(position) == Rejected(VID, reason, position)


def test_first_problem_found_is_the_reason() -> None:
    result = parse(raw(Latitude=None, Speed=-1, Ignition="on"))
    assert isinstance(result, Rejected)
    assert result.reason == "Latitude: must be a number"


# -- parse_batch -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        [],
        "PvtMessages",
        1,
        None,
        {},
        {"pvtMessages": []},
        {"PvtMessages": None},
        {"PvtMessages": {}},
        {"PvtMessages": "[]"},
        {"PvtMessages": {"VehicleID": VID, "Positions": []}},
    ],
)
def test_wrong_shape_is_a_bad_request(body: Any) -> None:
    with pytest.raises(BadRequest, match="PvtMessages"):
        parse_batch(body, NOW_MS, MAX_FUTURE_MS)


def batch_of(*entries: Any, **top: Any) -> Any:
    return parse_batch({"PvtMessages": list(entries), **top}, NOW_MS, MAX_FUTURE_MS)


def test_empty_batch_is_fine() -> None:
    assert batch_of().positions == []
    assert batch_of().rejected == []


@pytest.mark.parametrize(
    ("entry", "vehicle_id", "reason"),
    [
        ("x", None, "PvtMessages[0]: not an object"),
        ([], None, "PvtMessages[0]: not an object"),
        ({"Positions": [raw()]}, None, "PvtMessages[0].VehicleID: missing"),
        ({"VehicleID": None, "Positions": [raw()]}, None, "PvtMessages[0].VehicleID: missing"),
        ({"VehicleID": "", "Positions": [raw()]}, None, "PvtMessages[0].VehicleID: empty"),
        ({"VehicleID": "   ", "Positions": [raw()]}, None, "PvtMessages[0].VehicleID: empty"),
        ({"VehicleID": True, "Positions": [raw()]}, None, "PvtMessages[0].VehicleID: must be text"),
        (
            {"VehicleID": 98.5, "Positions": [raw()]},
            None,
            "PvtMessages[0].VehicleID: must be text or an integer",
        ),
        (
            {"VehicleID": {"id": 1}, "Positions": [raw()]},
            None,
            "PvtMessages[0].VehicleID: must be text or an integer",
        ),
        (
            {"VehicleID": "9" * 129, "Positions": [raw()]},
            None,
            "PvtMessages[0].VehicleID: not a plausible id (printable, at most 128 chars)",
        ),
        (
            {"VehicleID": "98\n76", "Positions": [raw()]},
            None,
            "PvtMessages[0].VehicleID: not a plausible id (printable, at most 128 chars)",
        ),
        ({"VehicleID": VID}, VID, "PvtMessages[0].Positions: missing or not an array"),
        (
            {"VehicleID": VID, "Positions": None},
            VID,
            "PvtMessages[0].Positions: missing or not an array",
        ),
        (
            {"VehicleID": VID, "Positions": raw()},
            VID,
            "PvtMessages[0].Positions: missing or not an array",
        ),
    ],
)
def test_unusable_entry_is_quarantined_whole(
    entry: Any, vehicle_id: str | None, reason: str
) -> None:
    parsed = batch_of(entry)
    assert parsed.positions == []
    assert parsed.rejected == [Rejected(vehicle_id, reason, entry)]


def test_bad_entry_does_not_spoil_the_others() -> None:
    good = raw()
    bad_position = raw(Speed=-5, Timestamp="2023-10-25T16:29:32Z")
    entries = [
        {"LicensePlate": "no id", "Positions": [raw()]},
        {"VehicleID": VID, "LicensePlate": "AA-001-AAA", "Positions": [good, bad_position]},
    ]
    parsed = batch_of(*entries)
    assert [p.raw for p in parsed.positions] == [good]
    assert parsed.rejected == [
        Rejected(None, "PvtMessages[0].VehicleID: missing", entries[0]),
        Rejected(VID, "Speed: -5 out of range (>= 0)", bad_position),
    ]


@pytest.mark.parametrize(
    ("vehicle_id", "expected"),
    [(9876543, "9876543"), ("9876543", "9876543"), (" 9876543 ", "9876543"), (0, "0")],
)
def test_vehicle_id_is_text(vehicle_id: Any, expected: str) -> None:
    parsed = batch_of({"VehicleID": vehicle_id, "Positions": [raw()]})
    assert [p.vehicle_id for p in parsed.positions] == [expected]


def test_missing_license_plate_and_extra_fields_are_fine() -> None:
    parsed = batch_of(
        {"VehicleID": VID, "Positions": [raw(), raw(Timestamp="2023-10-25T16:29:41Z")], "X": 1},
        {"VehicleID": "1111111", "LicensePlate": None, "Positions": [], "Driver": {"Id": 3}},
        Version="2",
    )
    assert [(p.vehicle_id, p.event_ts) for p in parsed.positions] == [
        (VID, "2023-10-25T16:29:31.087Z"),
        (VID, "2023-10-25T16:29:41.000Z"),
    ]
    assert parsed.rejected == []


# -- decode_body -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "body is not valid JSON: Expecting value at line 1"),
        (b"{", "body is not valid JSON"),
        (b"PvtMessages", "body is not valid JSON"),
        (b'{"a": NaN}', "body is not valid JSON: NaN is not allowed"),
        (b'{"a": Infinity}', "body is not valid JSON: Infinity is not allowed"),
        (b'{"a": -Infinity}', "body is not valid JSON: -Infinity is not allowed"),
        (b'{"a": 1e400}', "body is not valid JSON: number 1e400 is out of range"),
        (b'{"a": -1e400}', "body is not valid JSON: number -1e400 is out of range"),
        (b"[" * 100_000, "body is not valid JSON: nested too deeply"),
        (
            b'{"a": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
            "body is not valid JSON: nested too deeply",
        ),
        (b'{"a": "\xff"}', "body is not UTF-8 (byte 7)"),
        (b'{"a": "\xc3"}', "body is not UTF-8 (byte 7)"),
        (b"\xff\xfe{\x00}\x00", "body is not UTF-8 (byte 0)"),
        (b'{"a": ' + b"9" * 5000 + b"}", "body is not valid JSON: Exceeds the limit"),
        (b"\xef\xbb\xbf{}", "body is not valid JSON: Unexpected UTF-8 BOM"),
        (b'{"a": 1} {"b": 2}', "body is not valid JSON: Extra data"),
    ],
)
def test_decode_body_rejects(body: bytes, detail: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_body(body)
    assert str(info.value).startswith(detail)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"PvtMessages": []}', {"PvtMessages": []}),
        (b'{"a": 1e308, "b": -1.5e-300}', {"a": 1e308, "b": -1.5e-300}),
        (b'{"a": "Z\\u00e9 \xc3\xa9"}', {"a": "Zé é"}),
        (b'{"a": ' + b"9" * 400 + b"}", {"a": int("9" * 400)}),
        (b'  {"a": [[[]]]}\n', {"a": [[[]]]}),
    ],
)
def test_decode_body_accepts_strict_json(body: bytes, expected: Any) -> None:
    assert decode_body(body) == expected


# -- event types -----------------------------------------------------------------------

ON, OFF = True, False


@pytest.mark.parametrize(
    ("state", "ts", "ignition", "event_type", "new_state"),
    [
        # first position ever seen: PERIODIC, whatever the ignition
        (None, 100, ON, "PERIODIC", VehicleState(100, ON)),
        (None, 100, OFF, "PERIODIC", VehicleState(100, OFF)),
        (VehicleState(100, ON), 200, OFF, "IGNITION_OFF", VehicleState(200, OFF)),
        (VehicleState(100, OFF), 200, ON, "IGNITION_ON", VehicleState(200, ON)),
        (VehicleState(100, ON), 200, ON, "PERIODIC", VehicleState(200, ON)),
        (VehicleState(100, OFF), 200, OFF, "PERIODIC", VehicleState(200, OFF)),
        # late arrival: PERIODIC and the state stays
        (VehicleState(200, ON), 100, OFF, "PERIODIC", VehicleState(200, ON)),
        (VehicleState(200, OFF), 100, ON, "PERIODIC", VehicleState(200, OFF)),
        # same instant again (a re-sent position): unchanged
        (VehicleState(200, ON), 200, OFF, "PERIODIC", VehicleState(200, ON)),
    ],
)
def test_next_event_type(
    state: VehicleState | None,
    ts: int,
    ignition: bool,
    event_type: str,
    new_state: VehicleState,
) -> None:
    assert next_event_type(state, ts, ignition) == (event_type, new_state)


def test_event_types_along_a_trip() -> None:
    # (ts, ignition) in arrival order, with one late arrival at ts 25
    trip = [(10, OFF), (20, ON), (30, ON), (25, OFF), (40, OFF), (40, ON), (50, ON)]
    state: VehicleState | None = None
    types = []
    for ts, ignition in trip:
        event_type, state = next_event_type(state, ts, ignition)
        types.append(event_type)
    assert types == [
        "PERIODIC",
        "IGNITION_ON",
        "PERIODIC",
        "PERIODIC",
        "IGNITION_OFF",
        "PERIODIC",
        "IGNITION_ON",
    ]
    assert state == VehicleState(50, ON)


# -- events ----------------------------------------------------------------------------

RECEIVED = "2023-10-25T16:30:00.000Z"


def event_for(**changes: Any) -> dict[str, Any]:
    position = parse(raw(**changes))
    assert isinstance(position, Position)
    return build_event(position, "IGNITION_ON", "frotcom", RECEIVED)


def test_event_without_odometer_has_exactly_the_spec_keys() -> None:
    assert event_for(Altitude=15, Direction=90, Odometer=None) == {
        "event_type": "IGNITION_ON",
        "event_ts": "2023-10-25T16:29:31.087Z",
        "source": {
            "provider": "frotcom",
            "device_id": VID,
            "provider_event_id": "frotcom:9876543:2023-10-25T16:29:31.087Z",
            "provider_received_ts": RECEIVED,
        },
        "position": {"latitude": 41.40338, "longitude": 2.17803},
    }


@pytest.mark.parametrize("odometer", [0, 45231.4])
def test_event_with_odometer_carries_complete_telemetry(odometer: float) -> None:
    event = event_for(Odometer=odometer, Speed=0, Ignition=False)
    assert event["telemetry"] == {"speed": 0.0, "ignition": False, "odometer": float(odometer)}
    assert set(event) == {"event_type", "event_ts", "source", "position", "telemetry"}


def test_event_uses_the_configured_provider() -> None:
    position = parse(raw(Timestamp="2023-10-25T18:29:31+02:00"))
    assert isinstance(position, Position)
    event = build_event(position, "PERIODIC", "acme", RECEIVED)
    assert event["source"]["provider"] == "acme"
    assert event["source"]["provider_event_id"] == "acme:9876543:2023-10-25T16:29:31.000Z"
    assert event["event_ts"] == "2023-10-25T16:29:31.000Z"


@pytest.mark.parametrize("odometer", [None, 12.5])
def test_with_vin_adds_chassis_number_and_nothing_else(odometer: float | None) -> None:
    event = event_for(Odometer=odometer)
    body = with_vin(json.dumps(event), VIN)
    sent = json.loads(body)
    assert sent == {**event, "chassis_number": VIN}
    # An independent reading of Cartrack's spec (the fake's validator) accepts it.
    assert validate_event(sent, datetime(2023, 10, 25, 16, 30, tzinfo=UTC)) == []


def test_with_vin_keeps_non_ascii_as_utf8() -> None:
    body = with_vin('{"source": {"device_id": "Zé"}}', VIN)
    assert body == '{"source":{"device_id":"Zé"},"chassis_number":"WDB9634031L123456"}'.encode()


@pytest.mark.parametrize(
    "payload",
    [
        '{"event_type":"PERIODIC","position":{"latitude":41.40338,"longitude":-2.5}}',
        '{"source":{"device_id":"Zé \\"quoted\\" \\\\"},"odometer":null}',
        '{"note":"a\\": b, c","n":[1,{}]}',  # looks spaced inside a string
        '{"a": 1, "b": {"c": "d"}}',  # spaced
        '{"chassis_number":"OLD","a":1}',  # replaced in place, not added twice
        "{}",
        '{"big":123456789012345678901234567890}',
    ],
)
def test_with_vin_is_what_decoding_and_encoding_would_give(payload: str) -> None:
    # Compact payloads take a text splice: byte for byte what the long way produces.
    expected = {**json.loads(payload), "chassis_number": VIN}
    assert (
        with_vin(payload, VIN)
        == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    )


@settings(max_examples=300, derandomize=True, database=None)
@given(
    start=st.one_of(st.none(), st.builds(VehicleState, st.integers(0, 20), st.booleans())),
    moments=st.lists(st.tuples(st.integers(0, 20), st.booleans()), max_size=12),
)
def test_event_types_is_next_event_type_along_the_positions(
    start: VehicleState | None, moments: list[tuple[int, bool]]
) -> None:
    state = start
    expected = []
    for ts, ignition in moments:
        event_type, state = next_event_type(state, ts, ignition)
        expected.append(event_type)
    types, final = event_types(start, moments)
    assert (types or ["PERIODIC"] * len(moments)) == expected
    assert types is None or set(types) != {"PERIODIC"}
    assert final == state
