"""relay/_rows.c against the Python code it stands in for: the same outbox rows.

The compiled hot path builds a documented body's rows (relay.frotcom.Documented.rows)
and BatchJob falls back to Python whenever it answers None. Every test here builds
the same job twice, once through C and once with the module taken away, and asserts
the two are equal value for value: what the INSERT binds, the event types' inputs,
the order of vehicles and rows.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import has_c_compiler
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import frotcom
from relay.frotcom import Documented, parse_body
from relay.mapping import ParsedBatch
from relay.outbox.batch import BatchJob
from relay.timeutil import format_ms

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
FUTURE_MS = 300_000
LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

try:
    from relay import _rows
except ImportError:
    _rows = None  # type: ignore[assignment]


def test_the_hot_path_is_built_wherever_a_compiler_is() -> None:
    # setup.py marks the extension optional so an install without a compiler still
    # works; where there is one, a missing module would mean a silently slower relay.
    if not has_c_compiler():
        pytest.skip("no C compiler: the relay runs its Python rows")
    assert _rows is not None, "relay._rows was not built: run `pip install -e .` again"
    assert frotcom._rows is _rows


needs_c = pytest.mark.skipif(_rows is None, reason="relay._rows is not built")


@pytest.fixture
def python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frotcom, "_rows", None)


def body(*messages: dict[str, Any]) -> bytes:
    return json.dumps({"PvtMessages": list(messages)}).encode()


def message(vehicle: Any, *positions: dict[str, Any]) -> dict[str, Any]:
    return {"VehicleID": vehicle, "LicensePlate": "AA-001-AAA", "Positions": list(positions)}


def position(ts_ms: int, **values: Any) -> dict[str, Any]:
    return {
        "Timestamp": format_ms(ts_ms),
        "Latitude": 41.40338,
        "Longitude": 2.17803,
        "Speed": 45.0,
        "Direction": 20.0,
        "Ignition": True,
        **values,
    }


def groups(job: BatchJob) -> list[tuple[Any, ...]]:
    return [
        (vehicle, g.held, g.moments, g.rows, g.values, g.steady)
        for vehicle, g in job.by_vehicle.items()
    ]


def both(
    raw: bytes,
    vehicles: dict[str, str] | None = None,
    provider: str = "frotcom",
    received_ms: int = NOW_MS,
    now_ms: int = NOW_MS,
) -> tuple[BatchJob, bool]:
    """The job made through C and through Python, asserted equal; and whether C made it."""
    batch = parse_body(raw, now_ms, FUTURE_MS)
    compiled = (
        isinstance(batch, Documented)
        and batch.rows(provider, format_ms(received_ms), vehicles or {}) is not None
    )
    job = BatchJob(batch, vehicles or {}, provider, received_ms)
    saved = frotcom._rows
    frotcom._rows = None  # type: ignore[assignment]
    try:
        python = BatchJob(parse_body(raw, now_ms, FUTURE_MS), vehicles or {}, provider, received_ms)
    finally:
        frotcom._rows = saved
    assert groups(job) == groups(python)
    assert (job.positions, job.rejected, job.mapped, job.quarantined) == (
        python.positions,
        python.rejected,
        python.mapped,
        python.quarantined,
    )
    return job, compiled


# --- the usual body is built in C, the same as in Python ----------------------------------


@needs_c
def test_a_documented_body_is_built_in_c_with_the_same_rows() -> None:
    raw = body(
        message("9876543", *(position(NOW_MS - 60_000 + i * 1000) for i in range(10))),
        message("42", position(NOW_MS - 5000, Odometer=1234.5, Ignition=False)),
    )
    job, compiled = both(raw, vehicles={"42": "VIN42"})
    assert compiled
    assert list(job.by_vehicle) == ["42", "9876543"]  # VehicleID order, as sorted() gives
    [row] = job.by_vehicle["42"].rows
    assert row[4] == "pending"
    assert json.loads(row[8])["telemetry"] == {"speed": 45.0, "ignition": False, "odometer": 1234.5}
    assert job.by_vehicle["9876543"].held
    assert job.by_vehicle["9876543"].steady


@needs_c
def test_positions_out_of_order_and_repeated_sort_as_in_python() -> None:
    t = NOW_MS - 60_000
    raw = body(
        message("7", position(t + 3000), position(t + 1000, Ignition=False), position(t + 1000)),
        message(" 7 ", position(t + 2000), position(t)),  # the same vehicle once stripped
        message(7, position(t + 1000, Speed=3)),
    )
    job, compiled = both(raw)
    assert compiled
    [group] = job.by_vehicle.values()
    assert [m[0] - t for m in group.moments] == [0, 1000, 1000, 1000, 2000, 3000]
    assert not group.steady


@needs_c
def test_an_event_ahead_of_its_receipt_is_due_at_its_own_time() -> None:
    ahead = NOW_MS + 1000  # within the future bound, after the relay received it
    job, compiled = both(body(message("1", position(ahead))), received_ms=NOW_MS)
    assert compiled
    [row] = job.by_vehicle["1"].rows
    assert row[5] == format_ms(ahead)
    assert row[6] == format_ms(NOW_MS)


@needs_c
def test_the_source_is_the_text_as_sent() -> None:
    raw = (
        b'{"PvtMessages": [{"VehicleID": "1", "Positions": [{"Timestamp": '
        b'"2023-11-14T22:00:00.087Z", "Latitude": 1, "Longitude": -2.50, '
        b'"Speed": 0, "Ignition": false, "Odometer": 1e3, "Direction": null}]}]}'
    )
    job, compiled = both(raw)
    assert compiled
    [row] = job.by_vehicle["1"].rows
    assert row[9] == raw[raw.index(b'{"Timestamp"') : raw.index(b"}]}]}") + 1].decode()
    assert json.loads(row[8])["position"] == {"latitude": 1.0, "longitude": -2.5}


# --- what C leaves to Python: the same rows all the same ----------------------------------


@needs_c
@pytest.mark.parametrize(
    ("raw", "provider"),
    [
        (body(message('say "hi"', position(NOW_MS - 1000))), "frotcom"),
        (body(message("back\\slash", position(NOW_MS - 1000))), "frotcom"),
        (body(message("motorista-é", position(NOW_MS - 1000))), "frotcom"),
        (body(message("1", position(NOW_MS - 1000))), "frötcom"),
        (body(message("1", position(NOW_MS - 1000))), 'fro"tcom'),
        (body(message("1", position(NOW_MS - 1000, Latitude=1e-5))), "frotcom"),
        (body(message("1", position(NOW_MS - 1000, Speed=1e16, Odometer=1.0))), "frotcom"),
        (body(message("1", position(NOW_MS - 1000, Odometer=5e-324))), "frotcom"),
        (body(message("1", position(NOW_MS - 1000, Odometer=1.7e308))), "frotcom"),
    ],
)
def test_text_or_numbers_c_does_not_write_are_left_to_python(raw: bytes, provider: str) -> None:
    _, compiled = both(raw, provider=provider)
    assert not compiled


@needs_c
@pytest.mark.parametrize(
    "stamp",
    [
        "2023-11-14T22:00:00Z",  # no milliseconds: valid, but not the canonical text
        "2023-11-14T22:00:00.087+00:00",
        "2023-11-14 22:00:00.087Z",
        "2023-11-14T22:00:00.087z",
    ],
)
def test_a_timestamp_not_in_canonical_form_is_read_in_python(stamp: str) -> None:
    raw = body(message("1", {**position(NOW_MS), "Timestamp": stamp}))
    batch = parse_body(raw, NOW_MS, FUTURE_MS)
    assert isinstance(batch, ParsedBatch)
    assert batch.count == 1
    both(raw)


@pytest.mark.parametrize(
    "stamp",
    [
        "2023-02-29T00:00:00.000Z",  # not a leap year
        "2024-04-31T00:00:00.000Z",
        "2023-11-14T24:00:00.000Z",
        "2023-11-14T22:60:00.000Z",
        "2023-11-14T22:00:60.000Z",
        "0000-01-01T00:00:00.000Z",
        "2023-13-01T00:00:00.000Z",
        "2023-00-10T00:00:00.000Z",
        "2023-11-14T22:00:00.0\uff187Z",  # a digit from another script (fullwidth 8)
        "2023-11-14T22:18:20.001Z",  # 1 ms past the future bound
    ],
)
def test_a_timestamp_python_refuses_c_refuses_too(stamp: str) -> None:
    raw = body(message("1", {**position(NOW_MS), "Timestamp": stamp}))
    batch = parse_body(raw, NOW_MS, FUTURE_MS)
    assert not isinstance(batch, Documented)
    assert batch.count == 0
    assert len(batch.rejected) == 1


@needs_c
@settings(max_examples=300, derandomize=True, database=None)
@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
@example(datetime(2024, 2, 29, 23, 59, 59, 999000))
@example(datetime(1969, 12, 31, 23, 59, 59, 999000))
@example(datetime(1, 1, 1))
def test_every_instant_reads_to_the_same_milliseconds(moment: datetime) -> None:
    ms = (moment.replace(tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        milliseconds=1
    )
    job, compiled = both(body(message("1", position(ms))), now_ms=LAST_MS)
    assert compiled
    assert job.by_vehicle["1"].moments == [(ms, True)]


# --- any documented body: the same rows ---------------------------------------------------

FLOATS = st.one_of(
    st.floats(-90, 90),
    st.integers(-90, 90),
    st.sampled_from([0, 0.0, -0.0, 1e-4, -1e-4, 9.999e-5, 1e-7, 45, 90.0, 0.1, 1 / 3]),
)
BIG = st.one_of(
    st.floats(0, 1e300),
    st.integers(0, 10**20),
    st.sampled_from([0, 1e15, 9999999999999998.0, 1e16, 123456789012345.67, 5e-324]),
)


@st.composite
def positions(draw: st.DrawFn) -> dict[str, Any]:
    p = {
        "Timestamp": format_ms(NOW_MS - draw(st.integers(-FUTURE_MS, 10**10))),
        "Latitude": draw(FLOATS),
        "Longitude": draw(FLOATS),
        "Speed": draw(BIG),
        "Ignition": draw(st.booleans()),
    }
    if draw(st.booleans()):
        p["Odometer"] = draw(st.one_of(st.none(), BIG))
    if draw(st.booleans()):
        p["Direction"] = draw(st.one_of(st.none(), st.floats(0, 360)))
    return p


VEHICLES = st.sampled_from(["9876543", "42", " 42", 42, 7, "V/1", 'q"', "é"])


@st.composite
def documented(draw: st.DrawFn) -> tuple[bytes, dict[str, str], str, int]:
    messages = [
        message(draw(VEHICLES), *draw(st.lists(positions(), max_size=5)))
        for _ in range(draw(st.integers(0, 4)))
    ]
    mapped = draw(st.sets(st.sampled_from(["9876543", "42", "7"])))
    provider = draw(st.sampled_from(["frotcom", "fleet-7", "frötcom"]))
    received = NOW_MS - draw(st.sampled_from([0, 10**9, 10**11]))
    return body(*messages), {v: f"VIN{v}" for v in mapped}, provider, received


@settings(max_examples=400, derandomize=True, database=None)
@given(documented())
def test_same_rows_as_python(case: tuple[bytes, dict[str, str], str, int]) -> None:
    raw, vehicles, provider, received = case
    both(raw, vehicles, provider, received)


@needs_c
def test_the_property_reaches_the_compiled_rows() -> None:
    # Most drawn bodies must go through C, or the property above proves little.
    hits = 0

    @settings(max_examples=200, derandomize=True, database=None)
    @given(documented())
    def count(case: tuple[bytes, dict[str, str], str, int]) -> None:
        nonlocal hits
        raw, vehicles, provider, received = case
        hits += both(raw, vehicles, provider, received)[1]

    count()
    assert hits >= 50


def test_without_the_module_a_documented_body_is_parsed_in_python(python_only: None) -> None:
    batch = parse_body(body(message("1", position(NOW_MS - 1000))), NOW_MS, FUTURE_MS)
    assert isinstance(batch, ParsedBatch)
    [p] = batch.positions
    assert p.source is not None  # still the one-pass decode, positions made in Python


@needs_c
def test_the_compiled_rows_leak_nothing() -> None:
    # A reference count wrong in C would grow the daemon's memory with every request;
    # tracemalloc sees every object the module makes, on each way out of it.
    cases = [
        body(
            message("1", *(position(NOW_MS - i * 1000, Odometer=12.5) for i in range(10))),
            message(7, position(NOW_MS - 5)),
        ),
        body(message('q"', position(NOW_MS - 1000))),  # text C does not write
        body(message("1", position(NOW_MS - 1000), position(NOW_MS - 2000, Latitude=1e-5))),
        body(message("1", {**position(NOW_MS), "Timestamp": "2023-02-29T00:00:00.000Z"})),
        body(message("1", position(NOW_MS + 10 * FUTURE_MS))),
    ]

    def requests(rounds: int) -> None:
        for _ in range(rounds):
            for raw in cases:
                BatchJob(parse_body(raw, NOW_MS, FUTURE_MS), {"1": "VIN1"}, "frotcom", NOW_MS)

    requests(100)  # caches, interned text
    gc.collect()
    tracemalloc.start()
    try:
        requests(100)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        requests(1000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1000, f"{grown} bytes more after 5,000 more requests"
