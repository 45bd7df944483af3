"""relay.frotcom's one-pass decoding against mapping's careful path: the same answers."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import frotcom
from relay.frotcom import Batch, Documented, parse_body
from relay.mapping import BadRequest, ParsedBatch, Position, decode_body, parse_batch
from relay.outbox.batch import BatchJob

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
FUTURE_MS = 300_000
GOOD = {
    "Timestamp": "2023-11-14T22:00:00.087Z",
    "Latitude": 41.40338,
    "Longitude": 2.17803,
    "Speed": 45.0,
    "Direction": 20.0,
    "Ignition": True,
}


def body_of(*positions: Any, vehicle: Any = "9876543", **message: Any) -> bytes:
    entry = {"VehicleID": vehicle, "LicensePlate": "AA-001-AAA", "Positions": list(positions)}
    return json.dumps({"PvtMessages": [{**entry, **message}]}).encode()


@pytest.fixture(autouse=True, params=["compiled", "python"])
def rows_module(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both ways a documented body is checked: relay/_rows.c's scan, and Python alone.
    if request.param == "python":
        monkeypatch.setattr(frotcom, "_rows", None)
    elif frotcom._rows is None:
        pytest.skip("relay._rows is not built")


def careful(body: bytes) -> ParsedBatch | str:
    try:
        return parse_batch(decode_body(body), NOW_MS, FUTURE_MS)
    except BadRequest as exc:
        return f"400: {exc}"


def fast(body: bytes) -> Batch | str:
    try:
        return parse_body(body, NOW_MS, FUTURE_MS)
    except BadRequest as exc:
        return f"400: {exc}"


def fields(p: Position) -> tuple[Any, ...]:
    # Everything but how the position's own JSON is carried (raw dict or source text),
    # which is compared by what it decodes to.
    source = json.loads(p.source) if p.source is not None else p.raw
    return (
        p.vehicle_id,
        p.ts_ms,
        p.event_ts,
        p.latitude,
        p.longitude,
        p.speed,
        p.ignition,
        p.odometer,
        source,
    )


def assert_same(body: bytes) -> Batch | str:
    want, got = careful(body), fast(body)
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
        return got
    assert [fields(p) for p in got.positions] == [fields(p) for p in want.positions]
    assert got.rejected == want.rejected
    assert (got.count, got.vehicle_count) == (want.count, want.vehicle_count)
    return got


def took_the_fast_path(result: Batch | str) -> bool:
    assert isinstance(result, ParsedBatch | Documented)
    return bool(result.positions) and all(p.source is not None for p in result.positions)


# --- which bodies take the one-pass decoding ----------------------------------------------


def test_documented_shape_is_decoded_in_one_pass_with_the_texts_as_sent() -> None:
    spaced = b'{"PvtMessages": [{"VehicleID": 42, "Positions": [{"Timestamp": '
    spaced += b'"2023-11-14T22:00:00Z", "Latitude": 1, "Longitude": -2.5, '
    spaced += b'"Speed": 0, "Ignition": false, "Direction": null, "Odometer": 12.5}]}]}'
    result = assert_same(spaced)
    assert took_the_fast_path(result)
    assert not isinstance(result, str)
    [p] = result.positions
    assert (p.vehicle_id, p.event_ts, p.latitude, p.odometer) == (
        "42",
        "2023-11-14T22:00:00.000Z",
        1.0,
        12.5,
    )
    # The source is the position's text exactly as it came, spaces and all.
    assert p.source == spaced[spaced.index(b'{"Timestamp"') : spaced.rindex(b"}]}]}") + 1].decode()


@pytest.mark.parametrize(
    "body",
    [
        body_of({**GOOD, "Altitude": 120}),  # a field Frotcom may add
        body_of(GOOD, Driver="x"),
        body_of({**GOOD, "Latitude": 90.5}),
        body_of({**GOOD, "Speed": -1}),
        body_of({**GOOD, "Speed": True}),
        body_of({**GOOD, "Ignition": 1}),
        body_of({**GOOD, "Direction": 361}),
        body_of({**GOOD, "Odometer": -0.5}),
        body_of({**GOOD, "Timestamp": "yesterday"}),
        body_of({**GOOD, "Timestamp": "2023-11-14T22:30:00Z"}),  # 17 minutes ahead
        body_of({**GOOD, "Timestamp": "2023-11-14T22:18:20.001Z"}),  # 1 ms past the bound
        body_of({k: v for k, v in GOOD.items() if k != "Speed"}),
        body_of(GOOD, vehicle="  "),
        body_of(GOOD, vehicle=True),
        body_of(GOOD, vehicle=1.5),
        body_of(GOOD, vehicle="x" * 129),
        body_of(GOOD, LicensePlate=7),
        body_of("not an object"),
        b'{"PvtMessages": [{"VehicleID": "1", "Positions": {}}]}',
        b'{"PvtMessages": {}}',
        b"[]",
        b'{"PvtMessages": [], "Extra": 1}',
        b'{"PvtMessages": [{"VehicleID": "1", "Positions": [{"Speed": 1e400}]}]}',
        b'{"PvtMessages": [{"VehicleID": "1", "Positions": [], "X": [[[[1]]]]}]}',
        b'{"PvtMessages": [{"VehicleID": "1", "Positions": [{"Speed": NaN}]}]}',
        b'\xff{"PvtMessages": []}',
        b'{"PvtMessages": [{"VehicleID": "\\ud800", "Positions": []}]}',
        b"",
    ],
)
def test_any_other_body_gets_the_careful_paths_answer(body: bytes) -> None:
    result = assert_same(body)
    assert isinstance(result, str) or not took_the_fast_path(result)


def test_a_position_right_on_the_future_bound_is_decoded_in_one_pass() -> None:
    assert took_the_fast_path(assert_same(body_of({**GOOD, "Timestamp": "2023-11-14T22:18:20Z"})))


def test_duplicate_keys_answer_as_the_careful_path_does() -> None:
    # orjson keeps the last value; the one-pass decoder checks every one.
    last_valid = b'{"PvtMessages": [{"VehicleID": "1", "Positions": [{"Timestamp": '
    last_valid += b'"2023-11-14T22:00:00Z", "Latitude": 95, "Latitude": 5, "Longitude": 0, '
    last_valid += b'"Speed": 0, "Ignition": true}]}]}'
    assert_same(last_valid)
    assert_same(
        last_valid.replace(b'"Latitude": 95, "Latitude": 5', b'"Latitude": 5, "Latitude": 95')
    )


def test_the_outbox_row_keeps_the_text_as_sent() -> None:
    body = body_of({**GOOD, "Speed": 45})  # an integer stays an integer in the source
    batch = parse_body(body, NOW_MS, FUTURE_MS)
    job = BatchJob(batch, {}, "frotcom", NOW_MS)
    [rows] = [group.rows for group in job.by_vehicle.values()]
    assert json.loads(rows[0][9]) == {**GOOD, "Speed": 45}
    assert '"Speed": 45,' in rows[0][9]


# --- any body of (nearly) the documented shape: the same answer ------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, -0.0, 90, -90, 180, -180, 360, 360.0000001, 1e-7, sys.float_info.max]),
)
VALUES = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=5))
STAMPS = st.one_of(
    st.sampled_from(
        [
            "2023-11-14T22:00:00.087Z",
            "2023-11-14T22:00:00Z",
            "2023-11-14 22:00:00+01:00",
            "2023-11-14T22:18:20.001Z",  # just past the 5-minute bound
            "2023-11-14T22:18:20.000Z",  # on it
            "2023-02-30T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "0001-01-01T00:00:00-01:00",
        ]
    ),
    st.text(max_size=30),
)


@st.composite
def positions(draw: st.DrawFn) -> Any:
    p: dict[str, Any] = {
        "Timestamp": draw(STAMPS),
        "Latitude": draw(st.one_of(st.floats(-91, 91), VALUES)),
        "Longitude": draw(st.one_of(st.floats(-181, 181), VALUES)),
        "Speed": draw(st.one_of(st.floats(0, 500), VALUES)),
        "Direction": draw(st.one_of(st.floats(0, 361), VALUES)),
        "Ignition": draw(st.one_of(st.booleans(), VALUES)),
        "Odometer": draw(st.one_of(st.floats(0, 1e7), VALUES)),
    }
    for key in draw(st.sets(st.sampled_from(sorted(p)), max_size=2)):
        del p[key]
    if draw(st.integers(0, 9)) == 0:
        p["Extra"] = draw(VALUES)
    return p


@st.composite
def near_documented(draw: st.DrawFn) -> Any:
    """A documented position with at most one value drawn at random (often still valid)."""
    p = {**GOOD, "Timestamp": draw(st.sampled_from(["2023-11-14T22:00:00Z", GOOD["Timestamp"]]))}
    key = draw(st.sampled_from([*sorted(GOOD), "Odometer", None]))
    if key is not None:
        p[key] = draw(st.one_of(st.floats(-400, 400), STAMPS if key == "Timestamp" else VALUES))
    return p


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    messy = draw(st.booleans())
    messages = [
        {
            "VehicleID": draw(
                st.one_of(st.sampled_from(["9876543", " 12 ", 7, "", "x" * 129]), VALUES)
            )
            if messy
            else draw(st.sampled_from(["9876543", "42", 7])),
            "LicensePlate": draw(st.one_of(st.just("AA-001-AAA"), VALUES))
            if messy
            else "AA-001-AAA",
            "Positions": draw(st.lists(positions() if messy else near_documented(), max_size=4)),
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    return json.dumps({"PvtMessages": messages}).encode()


@settings(max_examples=600, derandomize=True, database=None)
@given(bodies())
@example(body_of(GOOD))
@example(body_of({**GOOD, "Speed": 10**19}))
def test_same_answer_as_the_careful_path(body: bytes) -> None:
    assert_same(body)


def test_the_property_reaches_the_one_pass_decoding() -> None:
    # A property that only ever fell back would prove nothing about the fast path.
    hits = 0

    @settings(max_examples=200, derandomize=True, database=None)
    @given(bodies())
    def count(body: bytes) -> None:
        nonlocal hits
        result = fast(body)
        if not isinstance(result, str) and took_the_fast_path(result):
            hits += 1

    count()
    assert hits >= 10
