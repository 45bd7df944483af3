"""The forwarder against a real local fake Cartrack: every row of SPEC §2's response table.

Each test posts real Frotcom batches to the real app and asserts what an operator cares
about: which events Cartrack received (and when), and what the outbox rows say afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import VIN, VIN2, batch, position, post_batch, rows, wait_until
from hypothesis import given
from hypothesis import strategies as st

from relay.app import create_app, reload_vehicles
from relay.cartrack import DETAIL_LIMIT
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Received, Response
from relay.forwarder import _due_seconds
from relay.outbox import schema
from relay.outbox.storage import Outbox
from relay.state import STATE
from relay.timeutil import format_ms, parse_timestamp

A, B, C, D = "9876543", "1111111", "2222222", "3333333"
VIN3 = "JH4KA7561PC008269"
VIN4 = "5YJSA1E14HF000001"
VEHICLES = {A: VIN, B: VIN2, C: VIN3}
BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z

Start = Callable[..., Awaitable[TestClient]]


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


def ts(i: int) -> str:
    return format_ms(BASE_MS + i * 1000)


def pid(vehicle: str, i: int) -> str:
    return f"frotcom:{vehicle}:{ts(i)}"


def eid(event: object) -> str | None:
    if not isinstance(event, dict):
        return None
    return str(event["source"]["provider_event_id"])


def device(event: object) -> str | None:
    return str(event["source"]["device_id"]) if isinstance(event, dict) else None


def requests_for(fake: FakeCartrack, event_id: str) -> list[Received]:
    return [r for r in fake.requests if eid(r.event) == event_id]


def accepted_for(fake: FakeCartrack, vehicle: str) -> list[str]:
    return [e for e in fake.ids() if e.split(":")[1] == vehicle]


def fail_first(event_id: str, answers: list[Response]) -> Callable[[Any], Response | None]:
    """A responder answering ``event_id``'s first requests with ``answers``, then normally."""
    queue = list(answers)

    def respond(event: Any) -> Response | None:
        if eid(event) == event_id and queue:
            return queue.pop(0)
        return None

    return respond


def status_of(db: Path) -> dict[str, str]:
    return {r["provider_event_id"]: r["status"] for r in rows(db)}


def all_sent(db: Path, count: int) -> Callable[[], bool]:
    def check() -> bool:
        found = rows(db)
        return len(found) == count and all(r["status"] == "sent" for r in found)

    return check


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def start(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
) -> Start:
    """The real app delivering to the fake. The rescan is slow on purpose: rows must go
    out because the webhook notified the forwarder, not because a timer found them."""

    async def start(
        rescan_seconds: float = 60.0,
        rand: Callable[[], float] = random.random,
        vehicles: dict[str, str] = VEHICLES,
        **sections: Any,
    ) -> TestClient:
        config = make_config(url=cartrack.url, vehicles=vehicles, **sections)
        app = create_app(config, rescan_seconds=rescan_seconds, rand=rand)
        return await aiohttp_client(app)

    return start


async def post_ok(client: TestClient, *messages: tuple[str, list[dict[str, Any]]]) -> Any:
    status, body = await post_batch(client, batch(*messages))
    assert status == 200, body
    return body


def positions(*indexes: int) -> list[dict[str, Any]]:
    return [position(ts(i)) for i in indexes]


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


# -- 401/403: pause, probe, resume ------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure_pauses_everything_and_probes_on_the_backoff_schedule(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]], status: int
) -> None:
    initial, maximum = 0.02, 0.08
    cartrack.set_default(lambda event: Response(status))
    # rand = 1: every backoff is its ceiling, so the schedule is exact.
    client = await start(
        rand=lambda: 1.0, retry={"initial_seconds": initial, "max_seconds": maximum}
    )
    counts = {A: 17, B: 17, C: 16}
    await post_ok(client, *[(v, positions(*range(n))) for v, n in counts.items()])
    await cartrack.wait_for(lambda f: len(f.requests) >= 9)

    window = list(cartrack.requests)
    assert {r.status for r in window} == {status}
    outbox = rows(db_path)
    assert len(outbox) == 50
    assert {r["status"] for r in outbox} == {"pending"}  # never dead-lettered
    assert client.app[STATE].forwarder is not None
    assert client.app[STATE].forwarder.pause is not None
    # `status` shows the pause: it is in relay_state while it lasts.
    await wait_until(lambda: "forwarder_paused" in relay_state(db_path))
    assert f"refused the API key (HTTP {status})" in relay_state(db_path)["forwarder_paused"]

    # Before the pause began, at most one request per vehicle was out; after it, probes
    # go one at a time with gaps that grow like the backoff (initial * 2**k, capped).
    times = sorted(r.time for r in window)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    burst = 1
    while burst < len(counts) and gaps[burst - 1] < initial / 2:
        burst += 1
    probe_gaps = gaps[burst:]  # the first probe's gap is measured from the burst: skipped
    expected = [min(maximum, initial * 2**k) for k in range(1, len(probe_gaps) + 1)]
    assert len(probe_gaps) >= 9 - 1 - len(counts)
    for gap, want in zip(probe_gaps, expected, strict=True):
        assert gap >= want - 0.01, (probe_gaps, expected)

    cartrack.set_default(None)
    await wait_until(all_sent(db_path, 50))
    for vehicle, n in counts.items():
        assert accepted_for(cartrack, vehicle) == [pid(vehicle, i) for i in range(n)]
    assert len(events_named(logs, "forwarder_paused")) == 1
    assert len(events_named(logs, "forwarder_resumed")) == 1
    assert events_named(logs, "event_rejected") == []
    assert client.app[STATE].forwarder.pause is None
    assert "forwarder_paused" not in relay_state(db_path)


def relay_state(db: Path) -> dict[str, str]:
    with closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT key, value FROM relay_state").fetchall())


async def test_a_pause_left_by_a_dead_run_is_cleared_at_start(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    with closing(schema.connect(db_path, create=True)) as conn:
        conn.execute(
            "INSERT INTO relay_state VALUES ('forwarder_paused', 'left by a run killed"
            " while paused', '2026-01-19T08:00:00.000Z')"
        )
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))
    assert "forwarder_paused" not in relay_state(db_path)


async def test_a_transient_probe_answer_keeps_the_pause(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    # Only an answer about the event itself proves the key is good again.
    cartrack.script(Response(401), Response(503), Response(503))
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    assert [r.status for r in cartrack.requests] == [401, 503, 503, 202]
    assert len(events_named(logs, "cartrack_probe_failed")) == 2
    [resumed] = events_named(logs, "forwarder_resumed")
    assert resumed["probes"] == 3


async def test_a_rejected_probe_resumes_and_dead_letters_that_event(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.script(Response(403), Response(422, body="bad event"))
    client = await start()
    await post_ok(client, (A, positions(1, 2)))
    await wait_until(lambda: sorted(status_of(db_path).values()) == ["failed", "sent"])

    assert status_of(db_path) == {pid(A, 1): "failed", pid(A, 2): "sent"}
    assert len(events_named(logs, "forwarder_resumed")) == 1


async def test_shutdown_during_a_pause_is_prompt_and_counts_only_real_requests(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.set_default(lambda event: Response(401))
    # The first probe is 2 s away: B's lane, started during the pause, waits for it.
    client = await start(rand=lambda: 1.0, retry={"initial_seconds": 2, "max_seconds": 2})
    await post_ok(client, (A, positions(1)))
    await cartrack.wait_for(lambda f: len(f.requests) == 1)
    await wait_until(lambda: rows(db_path)[0]["attempts"] == 1)
    await post_ok(client, (B, positions(1)))
    forwarder = client.app[STATE].forwarder
    assert forwarder is not None
    await wait_until(lambda: forwarder.lanes == 2)

    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 1.0
    assert len(cartrack.requests) == 1
    by_id = {r["provider_event_id"]: r for r in rows(db_path)}
    assert {r["status"] for r in by_id.values()} == {"pending"}
    assert (by_id[pid(A, 1)]["attempts"], by_id[pid(A, 1)]["last_status"]) == (1, 401)
    # B never reached Cartrack: no attempt may be recorded for it.
    assert (by_id[pid(B, 1)]["attempts"], by_id[pid(B, 1)]["last_status"]) == (0, None)


# -- held vehicles and the vehicle map -------------------------------------------------------


async def test_unmapped_vehicle_is_held_then_released_by_reload(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    client = await start(vehicles={A: VIN})
    body = await post_ok(client, (B, positions(2, 1)), (A, positions(1)))
    assert body["held"] == 2
    await cartrack.wait_for(lambda f: f.ids() == [pid(A, 1)])
    await wait_until(lambda: status_of(db_path)[pid(A, 1)] == "sent")

    assert [r["status"] for r in rows(db_path, "vehicle_id = ?", (B,))] == ["held", "held"]
    assert accepted_for(cartrack, B) == []

    released = await reload_vehicles(client.app, {A: VIN, B: VIN2})
    assert released == {B: 2}
    # The rescan is a minute away: only the reload's notification can make this prompt.
    await cartrack.wait_for(lambda f: len(accepted_for(f, B)) == 2, timeout=5)
    assert accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2)]
    assert all(r.event["chassis_number"] == VIN2 for r in requests_for(cartrack, pid(B, 1)))
    await wait_until(all_sent(db_path, 3))


async def test_vehicle_removed_from_the_map_while_pending_is_held(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.set_default(lambda event: Response(503) if device(event) == B else None)
    client = await start()
    await post_ok(client, (B, positions(1, 2, 3)))
    await cartrack.wait_for(lambda f: len(requests_for(f, pid(B, 1))) >= 2)

    await reload_vehicles(client.app, {A: VIN, C: VIN3})
    assert {r["status"] for r in rows(db_path, "vehicle_id = ?", (B,))} == {"held"}

    # Cartrack would now accept B's events, but B's lane must give up instead of sending.
    cartrack.set_default(None)
    await wait_until(lambda: bool(events_named(logs, "vehicle_unmapped")))
    await post_ok(client, (A, positions(1)))
    await cartrack.wait_for(lambda f: pid(A, 1) in f.ids())
    assert accepted_for(cartrack, B) == []
    assert {r["status"] for r in rows(db_path, "vehicle_id = ?", (B,))} == {"held"}

    assert await reload_vehicles(client.app, VEHICLES) == {B: 3}
    await cartrack.wait_for(lambda f: len(accepted_for(f, B)) == 3, timeout=5)
    assert accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2), pid(B, 3)]


async def test_corrected_vin_applies_to_a_row_waiting_in_backoff(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    # Cartrack does not know VIN3; the operator fixes the map while the row retries.
    cartrack.set_default(lambda event: Response(503) if event["chassis_number"] == VIN3 else None)
    client = await start(vehicles={A: VIN3})
    await post_ok(client, (A, positions(1)))
    await cartrack.wait_for(lambda f: len(f.requests) >= 1)
    await reload_vehicles(client.app, {A: VIN})
    await wait_until(all_sent(db_path, 1))

    chassis = [r.event["chassis_number"] for r in cartrack.requests]
    assert chassis[-1] == VIN
    assert set(chassis[:-1]) == {VIN3}
    assert cartrack.accepted[0]["chassis_number"] == VIN


# -- restart, purge ---------------------------------------------------------------------------


async def test_restart_resumes_pending_rows_and_does_not_resend_sent_ones(
    make_config: Callable[..., Config], cartrack: FakeCartrack, db_path: Path
) -> None:
    config = make_config(url=cartrack.url, vehicles=VEHICLES)
    cartrack.set_default(lambda event: Response(503) if device(event) == B else None)
    first = TestClient(TestServer(create_app(config, rescan_seconds=60)))
    await first.start_server()
    try:
        await post_ok(first, (A, positions(1, 2)), (B, positions(1, 2)))
        await wait_until(
            lambda: [r["status"] for r in rows(db_path, "vehicle_id = ?", (A,))] == ["sent"] * 2
        )
        await cartrack.wait_for(lambda f: len(requests_for(f, pid(B, 1))) >= 1)
    finally:
        await first.close()
    assert [r["status"] for r in rows(db_path, "vehicle_id = ?", (B,))] == ["pending"] * 2

    cartrack.set_default(None)
    second = TestClient(TestServer(create_app(config, rescan_seconds=60)))
    await second.start_server()
    try:
        await wait_until(all_sent(db_path, 4))
    finally:
        await second.close()
    assert accepted_for(cartrack, B) == [pid(B, 1), pid(B, 2)]
    for i in (1, 2):
        assert len(requests_for(cartrack, pid(A, i))) == 1


async def test_purge_deletes_old_sent_rows_only(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    def answer(event: Any) -> Response | None:
        if device(event) == B:
            return Response(422)
        if device(event) == C:
            return Response(503, headers={"Retry-After": "3600"})
        return None

    cartrack.set_default(answer)
    # 0.2 s of retention, so the purge task runs every 0.05 s.
    client = await start(
        outbox={"keep_sent_days": 0.2 / 86400}, vehicles={A: VIN, B: VIN2, C: VIN3}
    )
    await post_ok(
        client, (A, positions(1)), (B, positions(1)), (C, positions(1)), (D, positions(1))
    )
    await wait_until(lambda: bool(events_named(logs, "sent_purged")))
    await cartrack.wait_for(lambda f: len(requests_for(f, pid(C, 1))) == 1)

    assert pid(A, 1) in cartrack.ids()
    assert status_of(db_path) == {pid(B, 1): "failed", pid(C, 1): "pending", pid(D, 1): "held"}


async def test_failed_ack_flush_is_retried_and_nothing_is_sent_twice(
    start: Start,
    cartrack: FakeCartrack,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
) -> None:
    # While acks cannot be written, delivered rows still read as pending; the lane, which
    # re-reads its vehicle's rows, must skip them rather than send them again.
    original = Outbox.mark_sent
    failures = 0

    async def flaky(self: Outbox, acks: Any) -> None:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise sqlite3.OperationalError("database is locked")
        await original(self, acks)

    monkeypatch.setattr(Outbox, "mark_sent", flaky)
    client = await start()
    count = 250  # more than one lane batch
    await post_ok(client, (A, positions(*range(count))))
    await wait_until(all_sent(db_path, count))

    assert failures == 3
    # The same failure again within the window is summarised, not logged each time.
    assert len(events_named(logs, "ack_flush_failed")) == 1
    assert cartrack.ids() == [pid(A, i) for i in range(count)]
    assert len(cartrack.requests) == count
    assert {r["attempts"] for r in rows(db_path)} == {1}


# -- crashes, storage errors, shutdown ------------------------------------------------------


async def test_rescan_crash_resolves_fatal_and_is_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    original = Outbox.pending_vehicles
    calls = 0

    async def flaky(self: Outbox) -> list[str]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("bug in the rescan")
        return await original(self)

    monkeypatch.setattr(Outbox, "pending_vehicles", flaky)
    client = await start(rescan_seconds=0.05)
    fatal = client.app[STATE].fatal
    assert fatal is not None
    error = await asyncio.wait_for(asyncio.shield(fatal), 5)
    assert isinstance(error, RuntimeError)
    [crash] = events_named(logs, "task_crashed")
    assert crash["task"] == "forwarder"
    assert crash["log_level"] == "critical"


async def test_lane_crash_resolves_fatal_and_is_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    async def broken(self: Outbox, vehicle_id: str, limit: int, skip: Any = ()) -> list[Any]:
        raise RuntimeError("bug in a lane")

    monkeypatch.setattr(Outbox, "next_rows", broken)
    client = await start()
    fatal = client.app[STATE].fatal
    assert fatal is not None
    await post_ok(client, (A, positions(1)))
    error = await asyncio.wait_for(asyncio.shield(fatal), 5)
    assert str(error) == "bug in a lane"
    [lane] = events_named(logs, "lane_crashed")
    assert lane["vehicle_id"] == A
    assert [e["task"] for e in events_named(logs, "task_crashed")] == ["forwarder"]


async def test_storage_error_in_a_lane_is_logged_and_the_lane_restarts(
    start: Start,
    cartrack: FakeCartrack,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
) -> None:
    original = Outbox.next_rows
    failures = 0

    async def flaky(self: Outbox, vehicle_id: str, limit: int, skip: Any = ()) -> list[Any]:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise sqlite3.OperationalError("database is locked")
        return await original(self, vehicle_id, limit, skip)

    monkeypatch.setattr(Outbox, "next_rows", flaky)
    client = await start(rescan_seconds=0.05)
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    [error] = events_named(logs, "lane_storage_error")
    assert error["vehicle_id"] == A
    assert client.app[STATE].fatal is not None
    assert not client.app[STATE].fatal.done()


async def test_storage_error_in_a_rescan_is_logged_and_survived(
    start: Start,
    cartrack: FakeCartrack,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
) -> None:
    original = Outbox.pending_vehicles
    calls = 0

    async def flaky(self: Outbox) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return await original(self)

    monkeypatch.setattr(Outbox, "pending_vehicles", flaky)
    client = await start(rescan_seconds=0.05)
    await wait_until(lambda: calls >= 3)
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    assert len(events_named(logs, "rescan_failed")) == 1
    assert not client.app[STATE].fatal.done()


async def test_shutdown_with_rows_in_backoff_is_prompt(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.set_default(lambda event: Response(503, headers={"Retry-After": "3600"}))
    client = await start(server={"shutdown_timeout_seconds": 5})
    await post_ok(client, *[(v, positions(1, 2)) for v in VEHICLES])
    await cartrack.wait_for(lambda f: len(f.requests) == 3)

    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 1.0  # far below the 5 s bound
    assert events_named(logs, "shutdown_timeout") == []
    assert {r["status"] for r in rows(db_path)} == {"pending"}
    assert len(cartrack.requests) == 3


async def test_shutdown_lets_in_flight_requests_finish_and_records_them(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.script(Response(202, delay=0.3))
    client = await start()
    await post_ok(client, (A, positions(1, 2)))
    await cartrack.wait_for(lambda f: len(f.requests) == 1)
    await client.close()

    # The request in flight finished and was recorded; the next row was not started.
    assert status_of(db_path) == {pid(A, 1): "sent", pid(A, 2): "pending"}
    assert len(cartrack.requests) == 1
    names = [e["event"] for e in logs]
    assert names.index("forwarder_stopped") < names.index("outbox_closed")


async def test_shutdown_starts_no_request_that_was_waiting_for_a_slot(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.set_default(lambda event: Response(202, delay=0.3))
    client = await start(cartrack={"concurrency": 1})
    await post_ok(client, (A, positions(1)), (B, positions(1)))
    await cartrack.wait_for(lambda f: len(f.requests) == 1)
    forwarder = client.app[STATE].forwarder
    assert forwarder is not None
    await wait_until(lambda: forwarder.lanes == 2)
    await client.close()

    assert len(cartrack.requests) == 1
    assert sorted(status_of(db_path).values()) == ["pending", "sent"]


async def test_shutdown_bound_cancels_a_hung_request(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.set_default(lambda event: Response(202, delay=3.0) if device(event) == B else None)
    client = await start(server={"shutdown_timeout_seconds": 0.3}, cartrack={"timeout_seconds": 5})
    await post_ok(client, (A, positions(1)), (B, positions(1)))
    await cartrack.wait_for(lambda f: len(f.requests) == 2)
    await wait_until(lambda: status_of(db_path)[pid(A, 1)] == "sent")
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 2.0

    [timeout] = events_named(logs, "shutdown_timeout")
    assert timeout["task"] == "forwarder"
    assert status_of(db_path)[pid(A, 1)] == "sent"
    assert status_of(db_path)[pid(B, 1)] == "pending"


# -- canonical log lines -------------------------------------------------------------------


async def test_failure_lines_carry_the_canonical_fields(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.script(Response(503, body="busy"), Response(422, body="bad chassis"))
    client = await start()
    await post_ok(client, (A, positions(1)))
    # The line follows the row's commit: wait for the line.
    await wait_until(lambda: bool(events_named(logs, "event_rejected")))
    [row] = rows(db_path)
    assert row["status"] == "failed"

    [retry] = events_named(logs, "delivery_failed")
    assert retry["next_attempt_at"] > retry["event_ts"]
    del retry["next_attempt_at"], retry["retry_in"]
    assert retry == {
        "event": "delivery_failed",
        "log_level": "warning",
        "row_id": row["id"],
        "vehicle_id": A,
        "event_ts": ts(1),
        "verdict": "transient",
        "status": 503,
        "reason": "503",
        "detail": "busy",
        "attempt": 1,
    }
    [dead] = events_named(logs, "event_rejected")
    assert dead == {
        "event": "event_rejected",
        "log_level": "error",
        "row_id": row["id"],
        "vehicle_id": A,
        "event_ts": ts(1),
        "verdict": "rejected",
        "status": 422,
        "reason": "422",
        "detail": "bad chassis",
        "attempt": 2,
        "next_attempt_at": None,
        "retry_in": None,
    }


async def test_pause_and_resume_are_one_line_each_with_a_reason(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    cartrack.script(Response(403))
    client = await start()
    await post_ok(client, (A, positions(1)))
    await wait_until(all_sent(db_path, 1))

    [paused] = events_named(logs, "forwarder_paused")
    assert (paused["reason"], paused["status"]) == ("cartrack refused the API key", 403)
    [resumed] = events_named(logs, "forwarder_resumed")
    assert resumed["reason"] == "a probe was answered HTTP 202"
    assert resumed["probes"] == 1
