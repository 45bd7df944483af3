"""What a webhook batch stores: retyped payloads, and event types the short way."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mapping import ParsedBatch, Position, VehicleState, build_event
from relay.outbox.batch import BatchJob, _dumps, _retyped
from relay.timeutil import format_ms

RECEIVED = "2026-11-22T10:00:00.000Z"


@pytest.mark.parametrize("kind", ["IGNITION_ON", "IGNITION_OFF"])
@pytest.mark.parametrize("odometer", [None, 45231.4])
def test_retyped_payload_is_the_encoded_retyped_event(kind: str, odometer: float | None) -> None:
    p = Position("V1", 0, format_ms(0), 41.5, 2.25, 50.0, True, odometer, {"x": 1})
    payload = _dumps(build_event(p, "PERIODIC", "frotcom", RECEIVED))
    row = ("id", "V1", p.event_ts, "PERIODIC", "pending", "n", "r", "u", payload, "{}")
    retyped = _retyped(row, kind)
    assert retyped[8] == _dumps(build_event(p, kind, "frotcom", RECEIVED))
    assert retyped[3] == kind
    assert retyped[:3] + retyped[4:8] + retyped[9:] == row[:3] + row[4:8] + row[9:]
    assert json.loads(retyped[8])["event_type"] == kind


def test_retyped_refuses_a_payload_it_cannot_retype_exactly() -> None:
    row = ("id", "V1", "t", "PERIODIC", "pending", "n", "r", "u", '{"event_ts":"t"}', "{}")
    with pytest.raises(ValueError, match="event_type"):
        _retyped(row, "IGNITION_ON")


@settings(max_examples=300, derandomize=True, database=None)
@given(
    moments=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=6),
    state=st.none() | st.tuples(st.integers(0, 6), st.booleans()),
    held=st.booleans(),
)
def test_steady_runs_take_the_short_way_to_the_same_rows(
    moments: list[tuple[int, bool]], state: tuple[int, bool] | None, held: bool
) -> None:
    # Repeated and unsorted instants included: those runs are not steady.
    positions = [
        Position("V1", ts * 1000, format_ms(ts * 1000), 1.0, 2.0, 3.0, ign, None, {})
        for ts, ign in moments
    ]
    vehicles = {} if held else {"V1": "VIN1"}
    job = BatchJob(ParsedBatch(positions, []), vehicles, "frotcom", 10_000)
    careful = BatchJob(ParsedBatch(positions, []), vehicles, "frotcom", 10_000)
    careful.by_vehicle["V1"].steady = False
    start = {} if state is None else {"V1": VehicleState(state[0] * 1000, state[1])}
    fast_states, careful_states = dict(start), dict(start)
    assert job._typed(fast_states) == careful._typed(careful_states)
    assert fast_states == careful_states


def test_a_steady_run_is_one_that_needs_no_pass() -> None:
    def run(*moments: tuple[int, bool]) -> bool:
        positions = [
            Position("V1", ts, format_ms(ts), 1.0, 2.0, 3.0, ign, None, {}) for ts, ign in moments
        ]
        return BatchJob(ParsedBatch(positions, []), {}, "f", 0).by_vehicle["V1"].steady

    assert run((1, True), (2, True), (3, True))
    assert not run((1, True), (2, False))
    assert run((2, False), (1, False))  # sorted by time first
