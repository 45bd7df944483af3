"""401/403 from Cartrack against a real local fake: a pause for every vehicle, probes on the
backoff schedule, a resume, and the log lines an operator reads about it.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    A,
    B,
    C,
    Start,
    rows,
    wait_until,
)
from forwarder_helpers import (
    accepted_for,
    all_sent,
    events_named,
    pid,
    positions,
    post_ok,
    status_of,
    ts,
)

from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.outbox import schema
from relay.state import STATE

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
