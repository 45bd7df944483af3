"""The forwarder around delivery, against a real local fake Cartrack: held vehicles and map
reloads, restarts and purges, crashes, storage errors and shutdown.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import (
    VEHICLES,
    VIN,
    VIN2,
    VIN3,
    A,
    B,
    C,
    D,
    Start,
    rows,
    wait_until,
)
from forwarder_helpers import (
    accepted_for,
    all_sent,
    device,
    events_named,
    failing,
    pid,
    positions,
    post_ok,
    requests_for,
    status_of,
)

from relay.app import create_app, reload_vehicles
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.outbox import writer
from relay.outbox.storage import Outbox
from relay.state import OUTBOX, STATE

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
    flaky = failing(
        monkeypatch,
        "mark_sent",
        lambda n: n <= 3,
        lambda: sqlite3.OperationalError("database is locked"),
    )
    client = await start()
    count = 250  # more than one lane batch
    await post_ok(client, (A, positions(*range(count))))
    await wait_until(all_sent(db_path, count))

    assert flaky.failed == 3
    # The same failure again within the window is summarised, not logged each time.
    assert len(events_named(logs, "ack_flush_failed")) == 1
    assert cartrack.ids() == [pid(A, i) for i in range(count)]
    assert len(cartrack.requests) == count
    assert {r["attempts"] for r in rows(db_path)} == {1}


# -- crashes, storage errors, shutdown ------------------------------------------------------


async def test_rescan_crash_resolves_fatal_and_is_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    failing(
        monkeypatch, "pending_vehicles", lambda n: n > 1, lambda: RuntimeError("bug in the rescan")
    )
    client = await start(rescan_seconds=0.05)
    fatal = client.app[STATE].fatal
    assert fatal is not None
    error = await asyncio.wait_for(asyncio.shield(fatal), 5)
    assert isinstance(error, RuntimeError)
    [crash] = events_named(logs, "task_crashed")
    assert crash["task"] == "forwarder"
    assert crash["log_level"] == "critical"


class WriterCrash(BaseException):
    """Nothing in the writer catches this: it ends the writer's thread."""


async def test_a_dead_outbox_writer_resolves_fatal_and_is_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    # Every write would fail from then on: the daemon must stop (and systemd restart
    # it), not carry on answering 500s.
    def crash(conn: Any, jobs: Any, listener: Any) -> Any:
        raise WriterCrash("bug in the writer's thread")

    client = await start()
    monkeypatch.setattr(writer, "run_group", crash)
    with pytest.raises(WriterCrash):
        await client.app[OUTBOX].check_writable()
    fatal = client.app[STATE].fatal
    assert fatal is not None
    error = await asyncio.wait_for(asyncio.shield(fatal), 5)
    # The writer's watch, or a task whose write failed first (WriterStopped, caused by it).
    assert isinstance(error, WriterCrash) or isinstance(error.__cause__, WriterCrash)
    [died] = events_named(logs, "outbox_writer_died")
    assert died["log_level"] == "critical"
    assert died["error"] == "WriterCrash: bug in the writer's thread"
    # Other tasks whose writes failed with it may crash too; the writer's own watch must.
    await wait_until(
        lambda: "outbox-writer" in [e["task"] for e in events_named(logs, "task_crashed")]
    )


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
    failing(
        monkeypatch,
        "next_rows",
        lambda n: n == 1,
        lambda: sqlite3.OperationalError("database is locked"),
    )
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
    rescans = failing(
        monkeypatch,
        "pending_vehicles",
        lambda n: n == 2,
        lambda: sqlite3.OperationalError("disk I/O error"),
    )
    client = await start(rescan_seconds=0.05)
    await wait_until(lambda: rescans.made >= 3)
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
