"""The forwarder against a real local fake Cartrack: every row of SPEC §2's response table.

Each test posts real Frotcom batches to the real app and asserts what an operator cares
about: which events Cartrack received (and when), and what the outbox rows say afterwards.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    VIN,
    VIN2,
    VIN3,
    VIN4,
    A,
    B,
    C,
    D,
    Start,
    position,
    rows,
    wait_until,
)
from forwarder_helpers import (
    accepted_for,
    all_sent,
    device,
    eid,
    events_named,
    fail_first,
    pid,
    positions,
    post_ok,
    requests_for,
    status_of,
)
from hypothesis import given
from hypothesis import strategies as st

from relay.cartrack import DETAIL_LIMIT
from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.forwarder import _due_seconds
from relay.timeutil import format_ms, parse_timestamp

# --- when a row is due (pure) ---------------------------------------------------------------


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_due_of_a_stored_timestamp_is_its_exact_instant(ms: int) -> None:
    # The fast read of format_ms's text gives the very float the full parser gives.
    assert _due_seconds(format_ms(ms)) == parse_timestamp(format_ms(ms)) / 1000 == ms / 1000


@pytest.mark.parametrize(
    "text",
    [
        "2025-01-01T00:00:00Z",
        "2025-01-01T01:00:00.250+01:00",
        "2025-01-01T00:00:00.123456Z",
        "2025-01-01T00:00:00.1Z",
        "2025-01-01T00:00:00",
    ],
)
def test_due_of_other_timestamp_forms_follows_parse_timestamp(text: str) -> None:
    assert _due_seconds(text) == parse_timestamp(text) / 1000


@pytest.mark.parametrize(
    "text", ["", "2025-13-01T00:00:00.000Z", "2025-01-01T00:00:60.000Z", "x" * 24]
)
def test_due_of_a_broken_timestamp_raises_what_parse_timestamp_raises(text: str) -> None:
    try:
        parse_timestamp(text)
    except ValueError as exc:
        wanted = str(exc)
    else:
        pytest.fail(f"{text!r} parsed")
    with pytest.raises(ValueError, match=re.escape(wanted)):
        _due_seconds(text)


# -- accepted ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299, 409])
async def test_accepted_statuses_mark_the_row_sent(
    start: Start, cartrack: FakeCartrack, db_path: Path, status: int
) -> None:
    cartrack.set_default(lambda event: Response(status, body="" if status == 204 else None))
    client = await start()
    await post_ok(client, (A, positions(1, 2)))
    await wait_until(all_sent(db_path, 2))

    for row in rows(db_path):
        assert row["attempts"] == 1
        assert row["last_status"] == status
        assert row["last_error"] is None
        assert row["sent_at"] is not None
        assert len(requests_for(cartrack, row["provider_event_id"])) == 1


# -- rejected: dead-lettered, never retried ------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 410, 422])
async def test_rejected_event_is_dead_lettered_once_with_detail(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]], status: int
) -> None:
    detail = '{"error": "' + "é" * 3000 + '"}'
    cartrack.set_default(
        lambda event: Response(status, body=detail) if eid(event) == pid(A, 2) else None
    )
    client = await start()
    await post_ok(client, (A, positions(1, 2, 3)), (B, positions(1, 2)))
    await wait_until(lambda: list(status_of(db_path).values()).count("sent") == 4)

    failed = rows(db_path, "status = 'failed'")
    assert [r["provider_event_id"] for r in failed] == [pid(A, 2)]
    assert failed[0]["last_status"] == status
    assert failed[0]["last_error"] == detail[:DETAIL_LIMIT]
    assert failed[0]["attempts"] == 1
    assert failed[0]["sent_at"] is None
    assert len(requests_for(cartrack, pid(A, 2))) == 1
    # The vehicle's later event and the other vehicle go on as if nothing happened.
    assert accepted_for(cartrack, A) == [pid(A, 1), pid(A, 3)]
    assert accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2)]
    [rejected] = events_named(logs, "event_rejected")
    assert rejected["status"] == status
    assert rejected["vehicle_id"] == A
    assert rejected["row_id"] == failed[0]["id"]
    assert rejected["log_level"] == "error"


# -- transient: retried with backoff until delivered ----------------------------------------


TRANSIENT = [
    pytest.param(Response(500), id="500"),
    pytest.param(Response(502), id="502"),
    pytest.param(Response(503), id="503"),
    pytest.param(Response(504), id="504"),
    pytest.param(Response(408), id="408"),
    pytest.param(Response(425), id="425"),
    pytest.param(Response(429), id="429"),
    pytest.param(Response(599), id="599"),
    pytest.param(Response(500, drop=True), id="dropped-connection"),
]


@pytest.mark.parametrize("answer", TRANSIENT)
async def test_transient_failures_are_retried_until_delivered(
    start: Start, cartrack: FakeCartrack, db_path: Path, answer: Response
) -> None:
    cartrack.set_default(fail_first(pid(A, 1), [answer, answer]))
    client = await start()
    await post_ok(client, (A, positions(1, 2)))
    await wait_until(all_sent(db_path, 2))

    head, after = rows(db_path)
    assert head["attempts"] == 3
    assert head["last_status"] == 202
    assert head["last_error"] is None
    assert [r.status for r in requests_for(cartrack, pid(A, 1))] == [
        0 if answer.drop else answer.status
    ] * 2 + [202]
    assert after["attempts"] == 1
    assert cartrack.ids() == [pid(A, 1), pid(A, 2)]


async def test_transient_failure_is_recorded_on_the_row_while_it_waits(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.set_default(
        lambda event: Response(503, body="try later", headers={"Retry-After": "3600"})
    )
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(lambda: rows(db_path)[0]["attempts"] == 1)

    [row] = rows(db_path)
    assert row["status"] == "pending"
    assert row["last_status"] == 503
    assert row["last_error"] == "try later"
    # Retry-After overrides retry.max_seconds (0.05 here).
    assert row["next_attempt_at"] > format_ms(int(time.time() * 1000) + 3000_000)


async def test_slow_answer_times_out_and_the_retry_is_absorbed_as_duplicate(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    # Cartrack stored the event but answered after our timeout: the retry gets a 409,
    # which is success.
    cartrack.script(Response(202, delay=1.0))
    client = await start(cartrack={"timeout_seconds": 0.2})
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    [row] = rows(db_path)
    assert row["attempts"] == 2
    assert row["last_status"] == 409
    assert [r.status for r in cartrack.requests] == [202, 409]
    [failure] = events_named(logs, "delivery_failed")
    assert failure["status"] is None
    assert "timeout" in failure["detail"]


async def test_retry_after_is_waited_at_least(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.script(Response(429, headers={"Retry-After": "1"}))
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    first, second = cartrack.requests
    assert (first.status, second.status) == (429, 202)
    assert second.time - first.time >= 1.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_transient_logged_and_not_followed(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]], status: int
) -> None:
    # Location points back at the ingest URL: following it (307/308 keep the POST) would
    # show up as a second request that the fake accepts.
    assert cartrack.url is not None
    cartrack.script(Response(status, headers={"Location": cartrack.url}))
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    assert [r.status for r in cartrack.requests] == [status, 202]
    assert rows(db_path)[0]["attempts"] == 2
    [redirect] = events_named(logs, "cartrack_redirect")
    assert redirect["status"] == status
    assert redirect["log_level"] == "error"


# -- ordering and concurrency ---------------------------------------------------------------


async def test_retried_event_is_delivered_before_the_vehicles_next_event(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.set_default(fail_first(pid(A, 1), [Response(503)] * 3))
    client = await start()
    await post_ok(client, (A, positions(3, 1, 2)), (B, positions(1)))
    await wait_until(all_sent(db_path, 4))

    sent_a = [eid(r.event) for r in cartrack.requests if device(r.event) == A]
    assert sent_a == [pid(A, 1)] * 4 + [pid(A, 2), pid(A, 3)]
    assert accepted_for(cartrack, A) == [pid(A, 1), pid(A, 2), pid(A, 3)]


async def test_one_request_in_flight_per_vehicle_and_vehicles_overlap_up_to_concurrency(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    delay = 0.1
    cartrack.set_default(lambda event: Response(202, delay=delay))
    vehicles = {A: VIN, B: VIN2, C: VIN3, D: VIN4}
    client = await start(vehicles=vehicles, cartrack={"concurrency": 2})
    await post_ok(client, *[(v, positions(1, 2, 3)) for v in vehicles])
    await wait_until(all_sent(db_path, 12))

    # The fake records arrival; a request is in flight at least until arrival + delay.
    # The interval is shortened a little so clock jitter cannot invent overlaps.
    spans = [(r.time, r.time + delay - 0.01, device(r.event)) for r in cartrack.requests]
    for vehicle in vehicles:
        own = sorted(s for s in spans if s[2] == vehicle)
        assert len(own) == 3
        for (_, end, _), (begin, _, _) in itertools.pairwise(own):
            assert begin >= end, f"vehicle {vehicle} had two requests in flight"

    def in_flight(at: float) -> int:
        return sum(1 for begin, end, _ in spans if begin <= at < end)

    most = max(in_flight(begin) for begin, _, _ in spans)
    assert most == 2  # different vehicles do overlap, but never beyond concurrency


async def test_a_lane_keeps_its_slot_for_its_batch_while_cartrack_accepts(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    # One slot, two vehicles with a backlog: each lane sends its batch in one go (their
    # acks then share pages of the outbox) rather than the two taking turns per event.
    client = await start(cartrack={"concurrency": 1})
    await post_ok(client, (A, positions(1, 2, 3, 4, 5)), (B, positions(1, 2, 3, 4, 5)))
    await wait_until(all_sent(db_path, 10))

    order = [device(r.event) for r in cartrack.requests]
    assert order in ([A] * 5 + [B] * 5, [B] * 5 + [A] * 5), order


async def test_a_lane_in_backoff_leaves_its_slot_to_other_vehicles(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    # A's second event is refused for an hour; with one slot, B must not wait for it.
    cartrack.set_default(
        lambda event: (
            Response(503, headers={"Retry-After": "3600"}) if eid(event) == pid(A, 2) else None
        )
    )
    client = await start(cartrack={"concurrency": 1})
    await post_ok(client, (A, positions(1, 2, 3)), (B, positions(1, 2, 3)))
    await wait_until(lambda: accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2), pid(B, 3)])

    assert accepted_for(cartrack, A) == [pid(A, 1)]
    assert status_of(db_path)[pid(A, 2)] == "pending"


async def test_a_lane_waiting_for_a_future_row_leaves_its_slot_to_other_vehicles(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    # A's second position is an hour ahead of the clock: it is not sent before then,
    # and with one slot B's events must not wait for it.
    later = format_ms(int(time.time() * 1000) + 3_600_000)
    client = await start(cartrack={"concurrency": 1})
    await post_ok(client, (A, [*positions(1), position(later)]), (B, positions(1, 2)))
    await wait_until(lambda: accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2)])

    assert accepted_for(cartrack, A) == [pid(A, 1)]
