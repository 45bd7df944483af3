"""create_app wiring: lifecycle order, health, supervision of background tasks, reload."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import VIN, VIN2, batch, position, post_batch, rows, wait_until

from relay.app import create_app, reload_vehicles
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.forwarder import Forwarder
from relay.outbox.schema import OutboxError
from relay.outbox.storage import Outbox
from relay.state import OUTBOX, STATE


def names(logs: list[dict[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


@pytest.fixture
def config(make_config: Callable[..., Config], cartrack: FakeCartrack) -> Config:
    return make_config(url=cartrack.url)


async def started(config: Config, **kwargs: Any) -> TestClient:
    client = TestClient(TestServer(create_app(config, **kwargs)))
    await client.start_server()
    return client


async def test_outbox_opens_first_and_closes_after_the_forwarder_stopped(
    config: Config, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    client = await started(config)
    try:
        state = client.app[STATE]
        assert state.forwarder is not None
        assert state.forwarder_task is not None
        assert not state.forwarder_task.done()
        assert client.app[OUTBOX].path == db_path
        assert (await post_batch(client, batch(("9876543", [position()]))))[0] == 200
        await cartrack.wait_for(lambda f: len(f.accepted) == 1)
    finally:
        await client.close()

    order = [n for n in names(logs) if n in {"outbox_opened", "forwarder_stopped", "outbox_closed"}]
    assert order == ["outbox_opened", "forwarder_stopped", "outbox_closed"]
    [stopped] = [e for e in logs if e["event"] == "forwarder_stopped"]
    assert stopped["sent"] == 1
    # The last ack was flushed before the outbox closed.
    assert [r["status"] for r in rows(db_path)] == ["sent"]
    assert "task_crashed" not in names(logs)
    assert "task_exited" not in names(logs)


async def test_healthz_is_ok_while_the_forwarder_runs(relay: TestClient) -> None:
    response = await relay.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "forwarder": "running"}


async def test_healthz_is_503_once_the_forwarder_stopped(config: Config) -> None:
    client = await started(config)
    try:
        state = client.app[STATE]
        assert state.forwarder is not None
        assert state.forwarder_task is not None
        await state.forwarder.stop()
        await asyncio.wait_for(state.forwarder_task, 5)
        response = await client.get("/healthz")
        assert response.status == 503
        assert await response.json() == {"status": "degraded", "forwarder": "stopped"}
        # An orderly stop is not a crash.
        assert state.fatal is not None
        assert not state.fatal.done()
    finally:
        await client.close()


async def test_healthz_reports_a_pause_without_failing(
    config: Config, cartrack: FakeCartrack
) -> None:
    cartrack.set_default(lambda event: Response(401))
    client = await started(config)
    try:
        assert (await post_batch(client, batch(("9876543", [position()]))))[0] == 200
        await cartrack.wait_for(lambda f: len(f.requests) >= 1)
        response = await client.get("/healthz")
        assert response.status == 200
        assert (await response.json())["forwarder"] == "paused"
    finally:
        await client.close()


async def test_forwarder_crash_resolves_fatal_and_fails_health(
    config: Config, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    async def broken(self: Outbox) -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(Outbox, "pending_vehicles", broken)
    client = await started(config)
    try:
        fatal = client.app[STATE].fatal
        assert fatal is not None
        assert str(await asyncio.wait_for(asyncio.shield(fatal), 5)) == "boom"
        response = await client.get("/healthz")
        assert response.status == 503
    finally:
        await client.close()
    [crash] = [e for e in logs if e["event"] == "task_crashed"]
    assert crash["task"] == "forwarder"


async def test_forwarder_returning_on_its_own_is_fatal(
    config: Config, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    async def quits(self: Forwarder) -> None:
        return None

    monkeypatch.setattr(Forwarder, "run", quits)
    client = await started(config)
    try:
        fatal = client.app[STATE].fatal
        assert fatal is not None
        error = await asyncio.wait_for(asyncio.shield(fatal), 5)
        assert "exited unexpectedly" in str(error)
    finally:
        await client.close()
    assert "task_exited" in names(logs)


async def test_unusable_outbox_fails_startup(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    db = tmp_path / "not-a-db.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    config = make_config(outbox={"path": str(db)})
    server = TestServer(create_app(config))
    with pytest.raises(OutboxError, match="not-a-db"):
        await server.start_server()
    await server.close()
    assert db.read_bytes() == b"this is not a database" * 100


async def test_start_releases_rows_held_for_vehicles_mapped_since(
    make_config: Callable[..., Config], cartrack: FakeCartrack, db_path: Path
) -> None:
    url = cartrack.url
    first = await started(make_config(url=url, vehicles={"9876543": VIN}))
    try:
        status, body = await post_batch(first, batch(("1111111", [position()])))
        assert (status, body["held"]) == (200, 1)
    finally:
        await first.close()
    assert [r["status"] for r in rows(db_path)] == ["held"]

    second = await started(make_config(url=url, vehicles={"9876543": VIN, "1111111": VIN2}))
    try:
        await cartrack.wait_for(lambda f: len(f.accepted) == 1)
        assert cartrack.accepted[0]["chassis_number"] == VIN2
        await wait_until(lambda: [r["status"] for r in rows(db_path)] == ["sent"])
    finally:
        await second.close()


async def test_reload_vehicles_reports_what_changed(
    relay: TestClient, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    status, body = await post_batch(
        relay, batch(("5555555", [position(), position(ts="2023-10-25T16:29:40Z")]))
    )
    assert (status, body["held"]) == (200, 2)

    released = await reload_vehicles(relay.app, {"9876543": VIN, "5555555": VIN2})
    assert released == {"5555555": 2}
    [reloaded] = [e for e in logs if e["event"] == "vehicles_reloaded"]
    assert reloaded["vehicles"] == 2
    assert reloaded["added"] == 1
    assert reloaded["removed"] == 1  # 1111111
    assert reloaded["released_rows"] == 2
    assert relay.app[STATE].vehicles == {"9876543": VIN, "5555555": VIN2}
    await wait_until(lambda: {r["status"] for r in rows(db_path)} == {"sent"})
