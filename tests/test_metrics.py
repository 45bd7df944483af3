"""/metrics, /readyz and /healthz through the real app, checked against the outbox and
the fake Cartrack's own record of what it was sent."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import TOKEN, VIN, batch, position, post_batch, rows, wait_until
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.app import create_app
from relay.cli import CliError
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.mapping import parse_batch
from relay.metrics import read_outbox
from relay.outbox import storage
from relay.outbox.storage import Outbox
from relay.state import OUTBOX, STATE
from relay.timeutil import format_ms

A, B, UNMAPPED = "9876543", "1111111", "5555555"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ts(i: int) -> str:
    return f"2023-10-25T16:29:{i:02d}.000Z"


def pid(vehicle: str, i: int) -> str:
    return f"frotcom:{vehicle}:{ts(i)}"


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


async def scrape(client: TestClient | aiohttp.ClientSession, url: str = "/metrics") -> Samples:
    response = await client.get(url)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(await response.text())


def scripted(answers: dict[str, list[Response]]) -> Callable[[Any], Response | None]:
    """A responder answering each listed event's first requests from its queue."""
    queues = {event_id: list(queue) for event_id, queue in answers.items()}

    def respond(event: Any) -> Response | None:
        queue = (
            queues.get(event["source"]["provider_event_id"]) if isinstance(event, dict) else None
        )
        return queue.pop(0) if queue else None

    return respond


def db_counts(db: Path) -> dict[str, int]:
    counts = Counter(r["status"] for r in rows(db))
    return {status: counts.get(status, 0) for status in ("pending", "held", "failed", "sent")}


# -- the counters against the outbox and Cartrack's record ----------------------------------


async def test_every_counter_matches_the_outbox_and_cartrack(
    relay: TestClient, cartrack: FakeCartrack, db_path: Path
) -> None:
    cartrack.set_default(
        scripted(
            {
                pid(A, 2): [Response(500), Response(429, headers={"Retry-After": "0"})],
                pid(A, 3): [Response(422, body={"error": "chassis_number unknown"})],
                pid(B, 1): [Response(202, drop=True)],
            }
        )
    )
    body = batch(
        (A, [position(ts(i)) for i in range(1, 5)]),
        (B, [position(ts(1)), position(ts(2)), position(ts(3), speed=-3)]),
        (UNMAPPED, [position(ts(1)), position(ts(2))]),
    )
    assert (await post_batch(relay, body))[0] == 200
    assert (await post_batch(relay, body))[0] == 200  # Frotcom re-sends: all duplicates
    assert (await post_batch(relay, body, token="wrong-token"))[0] == 401
    bad = await relay.post("/webhooks/frotcom", data=b"{", headers={"Authorization": TOKEN})
    assert bad.status == 400
    # A real disk-full: the outbox's connection may not grow the file.
    conn = relay.app[OUTBOX]._conn
    async with conn.execute("PRAGMA page_count") as cursor:
        (pages,) = await cursor.fetchone()  # type: ignore[misc]
    await conn.execute(f"PRAGMA max_page_count = {pages}")
    big = batch((A, [position(f"2023-10-25T17:{i // 60:02d}:{i % 60:02d}Z") for i in range(300)]))
    assert (await post_batch(relay, big))[0] == 500
    await conn.execute("PRAGMA max_page_count = 1073741823")

    await wait_until(
        lambda: db_counts(db_path) == {"pending": 0, "held": 2, "failed": 1, "sent": 5}
    )
    samples = await scrape(relay)

    outbox = rows(db_path)
    counts = db_counts(db_path)
    # Ingest: 9 entries per body (8 positions, 1 quarantined); the 300 of the disk-full
    # request were parsed, then refused.
    assert value(samples, "relay_positions_received_total") == 9 * 2 + 300
    assert value(samples, "relay_positions_stored_total") == len(outbox) == 8
    assert value(samples, "relay_positions_duplicate_total") == 8
    assert value(samples, "relay_positions_held_total") == counts["held"] == 2
    # Counted per request: the re-sent quarantined entry counts again, the table has it once.
    assert value(samples, "relay_positions_quarantined_total") == 2
    assert by_label(samples, "relay_webhook_requests_total", "status") == {
        "200": 2,
        "401": 1,
        "400": 1,
        "500": 1,
    }
    assert value(samples, "relay_webhook_ack_seconds_count") == 2
    assert value(samples, "relay_outbox_store_errors_total") == 1
    # Delivery, against the rows' final state.
    assert value(samples, "relay_events_sent_total") == counts["sent"] == 5
    assert by_label(samples, "relay_events_failed_total", "reason") == {"422": counts["failed"]}
    retried = by_label(samples, "relay_events_retried_total", "reason")
    assert retried == {"500": 1, "429": 1, "connection_error": 1}
    attempts = sum(r["attempts"] for r in outbox)
    assert sum(retried.values()) == attempts - counts["sent"] - counts["failed"]
    # Cartrack, against what the fake recorded (status 0: the connection was dropped).
    seen = Counter(
        "connection_error" if r.status == 0 else str(r.status) for r in cartrack.requests
    )
    assert by_label(samples, "relay_cartrack_responses_total", "status") == dict(seen)
    assert value(samples, "relay_cartrack_request_seconds_count") == len(cartrack.requests) == 9
    # Read from the outbox at scrape time.
    assert by_label(samples, "relay_outbox_positions", "status") == counts
    assert value(samples, "relay_outbox_oldest_pending_age_seconds") == 0
    assert value(samples, "relay_forwarder_paused") == 0
    assert value(samples, "relay_build_info", version=__version__) == 1


async def test_outbox_gauges_show_the_backlog_and_its_age(
    aiohttp_client: Callable[..., Any], make_config: Callable[..., Config], cartrack: FakeCartrack
) -> None:
    now = 1_700_000_000.0
    cartrack.set_default(lambda event: Response(503, headers={"Retry-After": "3600"}))
    # A frozen clock: the age is exactly the distance to the oldest pending timestamp.
    client = await aiohttp_client(
        create_app(make_config(url=cartrack.url), clock=lambda: now, rescan_seconds=0.2)
    )
    body = batch(
        (
            A,
            [
                position(format_ms(int(now - 3600) * 1000)),
                position(format_ms(int(now - 60) * 1000)),
            ],
        )
    )
    assert (await post_batch(client, body))[0] == 200
    await wait_until(lambda: rows(client.app[OUTBOX].path)[0]["attempts"] == 1)

    samples = await scrape(client)
    assert by_label(samples, "relay_outbox_positions", "status") == {
        "pending": 2,
        "held": 0,
        "failed": 0,
        "sent": 0,
    }
    assert value(samples, "relay_outbox_oldest_pending_age_seconds") == 3600
    assert by_label(samples, "relay_events_retried_total", "reason") == {"503": 1}


async def test_a_timeout_is_labelled_timeout(
    aiohttp_client: Callable[..., Any], make_config: Callable[..., Config], cartrack: FakeCartrack
) -> None:
    # Cartrack stores the event but answers after our timeout; the retry gets a 409.
    cartrack.script(Response(202, delay=1.0))
    config = make_config(url=cartrack.url, cartrack={"timeout_seconds": 0.2})
    client = await aiohttp_client(create_app(config, rescan_seconds=0.2))
    assert (await post_batch(client, batch((A, [position()]))))[0] == 200
    await wait_until(lambda: db_counts(config.outbox.path)["sent"] == 1)

    samples = await scrape(client)
    assert by_label(samples, "relay_cartrack_responses_total", "status") == {
        "timeout": 1,
        "409": 1,
    }
    assert by_label(samples, "relay_events_retried_total", "reason") == {"timeout": 1}
    assert value(samples, "relay_events_sent_total") == 1


async def test_read_outbox_never_reports_a_negative_age(db_path: Path) -> None:
    # A pending position from the near future waits until it is due: age 0, not negative.
    now_ms = 1_700_000_000_000
    outbox = await Outbox.open(db_path, clock=lambda: now_ms / 1000)
    try:
        parsed = parse_batch(batch((A, [position(format_ms(now_ms + 60_000))])), now_ms, 86_400_000)
        await outbox.store_batch(parsed, {A: VIN}, "frotcom", now_ms)
    finally:
        await outbox.close()
    snapshot = read_outbox(db_path, now_ms=now_ms)
    assert snapshot.counts == {"pending": 1, "held": 0, "failed": 0, "sent": 0}
    assert snapshot.oldest_pending_age == 0.0


async def test_paused_gauge_while_cartrack_refuses_the_key(
    aiohttp_client: Callable[..., Any], make_config: Callable[..., Config], cartrack: FakeCartrack
) -> None:
    # Probes a minute apart: the scrape sees the pause right after the one refusal.
    config = make_config(url=cartrack.url, retry={"initial_seconds": 60, "max_seconds": 60})
    relay = await aiohttp_client(create_app(config, rand=lambda: 1.0))
    cartrack.set_default(lambda event: Response(401))
    assert (await post_batch(relay, batch((A, [position()]))))[0] == 200
    await wait_until(lambda: relay.app[STATE].forwarder.pause is not None)  # type: ignore[union-attr]
    samples = await scrape(relay)
    assert value(samples, "relay_forwarder_paused") == 1
    assert by_label(samples, "relay_events_retried_total", "reason") == {"401": 1}
    # Paused is still ready: webhooks are stored, and sent once the key works again.
    response = await relay.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "forwarder": "paused"}


async def test_unreadable_outbox_drops_its_gauges_not_the_scrape(
    relay: TestClient, logs: list[dict[str, Any]]
) -> None:
    path = relay.app[OUTBOX].path
    moved = path.with_name("elsewhere.sqlite3")
    # The file is not where the config says (an operator moved it); the daemon's open
    # connection goes on working, and the scrape still answers, without outbox gauges.
    path.rename(moved)
    try:
        samples = await scrape(relay)
    finally:
        moved.rename(path)
    assert by_label(samples, "relay_outbox_positions", "status") == {}
    assert ("relay_outbox_oldest_pending_age_seconds", ()) not in samples
    assert value(samples, "relay_build_info", version=__version__) == 1
    [warning] = [e for e in logs if e["event"] == "metrics_outbox_unreadable"]
    assert "no outbox here" in warning["error"]
    assert by_label(await scrape(relay), "relay_outbox_positions", "status")["pending"] == 0


# The names agreed with contrib/'s dashboards and alerts, with their labels.
AGREED = {
    "relay_positions_received_total": set(),
    "relay_positions_stored_total": set(),
    "relay_positions_duplicate_total": set(),
    "relay_positions_quarantined_total": set(),
    "relay_positions_held_total": set(),
    "relay_webhook_requests_total": {"status"},
    "relay_webhook_ack_seconds": set(),
    "relay_outbox_store_errors_total": set(),
    "relay_events_sent_total": set(),
    "relay_events_failed_total": {"reason"},
    "relay_events_retried_total": {"reason"},
    "relay_cartrack_responses_total": {"status"},
    "relay_cartrack_request_seconds": set(),
    "relay_outbox_positions": {"status"},
    "relay_outbox_oldest_pending_age_seconds": set(),
    "relay_forwarder_paused": set(),
    "relay_build_info": {"version"},
}


async def test_exactly_the_agreed_names_are_exposed(
    relay: TestClient, cartrack: FakeCartrack
) -> None:
    cartrack.script(Response(500), Response(422))
    assert (await post_batch(relay, batch((A, [position(ts(1)), position(ts(2))]))))[0] == 200
    await wait_until(lambda: len(cartrack.requests) == 3)
    response = await relay.get("/metrics")
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus_client's creation timestamps, not ours
            name = family.name + "_total" if family.type == "counter" else family.name
            exposed.setdefault(name, set()).update(set(sample.labels) - {"le"})
    assert exposed == AGREED


def test_each_app_has_its_own_registry(make_config: Callable[..., Config]) -> None:
    first, second = create_app(make_config()), create_app(make_config())
    first[STATE].metrics.store_failed()
    one = parse(first[STATE].metrics.render().decode())
    two = parse(second[STATE].metrics.render().decode())
    assert value(one, "relay_outbox_store_errors_total") == 1
    assert value(two, "relay_outbox_store_errors_total") == 0


# -- a listener of their own ------------------------------------------------------------------


async def test_separate_listener_serves_the_probes_and_only_there(
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
    logs: list[dict[str, Any]],
) -> None:
    config = make_config(url=cartrack.url, metrics={"host": "127.0.0.1", "port": 0})
    client = await aiohttp_client(create_app(config, rescan_seconds=0.2))
    port = client.app[STATE].metrics_port
    assert port is not None
    assert port != client.port
    [listening] = [e for e in logs if e["event"] == "metrics_listening"]
    assert (listening["host"], listening["port"]) == ("127.0.0.1", port)

    assert (await post_batch(client, batch((A, [position()]))))[0] == 200
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as probes:
        samples = await scrape(probes)
        assert by_label(samples, "relay_webhook_requests_total", "status") == {"200": 1}
        assert (await probes.get("/healthz")).status == 200
        assert (await probes.get("/readyz")).status == 200
        assert (await probes.post("/webhooks/frotcom", json={})).status == 404
    for path in ("/metrics", "/healthz", "/readyz"):
        response = await client.get(path)
        assert response.status == 404
        assert await response.json() == {
            "error": "Not Found",
            "detail": f"no route for GET {path}; Frotcom batches go to POST /webhooks/frotcom;"
            f" {path} is served on the [metrics] port, {port}",
        }


async def test_separate_listener_says_stopping_while_the_relay_stops(
    make_config: Callable[..., Config], cartrack: FakeCartrack
) -> None:
    config = make_config(url=cartrack.url, metrics={"port": 0})
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    try:
        port = client.app[STATE].metrics_port
        await client.app.shutdown()  # what runner.cleanup does first: the stop begins
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as probes:
            response = await probes.get("/readyz")
            assert response.status == 503
            assert await response.json() == {"status": "not ready", "reasons": ["stopping"]}
    finally:
        await client.close()


async def test_metrics_port_in_use_fails_startup_with_one_line(
    make_config: Callable[..., Config], cartrack: FakeCartrack, db_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(url=cartrack.url, metrics={"port": port})
        server = TestServer(create_app(config))
        with pytest.raises(CliError, match=rf"cannot listen on 127.0.0.1:{port} \(\[metrics\]\)"):
            await server.start_server()
        await server.close()
    # It failed before the outbox was opened.
    assert not await asyncio.to_thread(db_path.exists)


# -- /readyz ------------------------------------------------------------------------------------


async def test_ready_when_the_outbox_is_writable_and_the_forwarder_runs(relay: TestClient) -> None:
    response = await relay.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "forwarder": "running"}


async def test_not_ready_while_the_outbox_is_read_only_then_ready_again(
    relay: TestClient,
) -> None:
    conn = relay.app[OUTBOX]._conn
    # SQLite refuses writes on this connection, as for a file it may only read.
    await conn.execute("PRAGMA query_only = 1")
    response = await relay.get("/readyz")
    assert response.status == 503
    assert await response.json() == {
        "status": "not ready",
        "reasons": ["outbox not writable: OperationalError: attempt to write a readonly database"],
    }
    # The webhook agrees: nothing can be stored, so Frotcom gets a 500.
    assert (await post_batch(relay, batch((A, [position()]))))[0] == 500

    await conn.execute("PRAGMA query_only = 0")
    assert (await relay.get("/readyz")).status == 200


async def test_not_ready_while_another_process_holds_the_write_lock(
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_MS", 100)
    client = await aiohttp_client(create_app(make_config(url=cartrack.url)))
    other = sqlite3.connect(client.app[OUTBOX].path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. an operator's long transaction
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["reasons"] == [
            "outbox not writable: OperationalError: database is locked"
        ]
        other.execute("ROLLBACK")
        assert (await client.get("/readyz")).status == 200
    finally:
        other.close()


async def test_not_ready_when_the_disk_is_nearly_full(
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
    tmp_path: Path,
) -> None:
    demand = storage.free_bytes(tmp_path) + 2**40
    client = await aiohttp_client(
        create_app(make_config(url=cartrack.url, outbox={"min_free_bytes": demand}))
    )
    response = await client.get("/readyz")
    assert response.status == 503
    [reason] = (await response.json())["reasons"]
    assert reason.startswith("outbox low on disk space: ")
    assert reason.endswith(f"below min_free_bytes={demand}")
    client.app[OUTBOX].min_free_bytes = 0  # space returns
    assert (await client.get("/readyz")).status == 200


async def test_not_ready_and_not_healthy_once_the_forwarder_died(
    make_config: Callable[..., Config], cartrack: FakeCartrack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Outbox) -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(Outbox, "pending_vehicles", broken)
    client = TestClient(TestServer(create_app(make_config(url=cartrack.url))))
    await client.start_server()
    try:
        fatal = client.app[STATE].fatal
        assert fatal is not None
        await asyncio.wait_for(asyncio.shield(fatal), 5)
        response = await client.get("/readyz")
        assert response.status == 503
        assert await response.json() == {
            "status": "not ready",
            "reasons": ["forwarder not running"],
        }
        health = await client.get("/healthz")
        assert health.status == 503
        assert await health.json() == {"status": "degraded", "forwarder": "stopped"}
    finally:
        await client.close()


async def test_probes_need_no_token(relay: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await relay.get(path, headers={"Authorization": "not-a-token"})
        assert response.status == 200, path
