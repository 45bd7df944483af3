"""Shared fixtures: real SQLite files, the real app, a real local fake Cartrack."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import sqlite3
import sysconfig
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from relay import logging as relay_logging
from relay.app import create_app
from relay.config import Config, parse_config
from relay.devtools.fake_cartrack import FakeCartrack
from relay.logging import configure_logging
from relay.outbox.storage import Outbox
from relay.timeutil import parse_timestamp

TOKEN = "1234-5678-9097-8466"
API_KEY = "test-api-key-0123456789"
VIN = "WDB9634031L123456"
VIN2 = "1HGCM82633A004352"
VIN3 = "JH4KA7561PC008269"
VIN4 = "5YJSA1E14HF000001"
# The forwarder's tests: four vehicles, the first three mapped.
A, B, C, D = "9876543", "1111111", "2222222", "3333333"
VEHICLES = {A: VIN, B: VIN2, C: VIN3}
BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z

Start = Callable[..., Awaitable[TestClient]]


def has_c_compiler() -> bool:
    """Whether the install could build the package's C extensions (setup.py)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    # Per test: some code under test (the demo, serve, cli.main) configures logging for
    # the whole process. Info level, so capture_logs() sees info events (the level filter
    # sits in the wrapper class, before capture_logs' processor); pytest shows output on
    # failure. Afterwards everything is put back, so a later test never logs into this
    # test's closed captured stdout.
    configure_logging("info", json=False)
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    secrets = set(relay_logging._secrets)
    try:
        yield
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
        relay_logging._secrets.clear()
        relay_logging._secrets.update(secrets)


@pytest.fixture
def spawn(tmp_path: Path, cartrack: FakeCartrack) -> Iterator[Callable[..., Any]]:
    """RelayProcess factory (tests/proc.py); every process is reaped, and no run may log
    a secret."""
    from proc import RelayProcess  # proc imports this module: not at import time

    made: list[RelayProcess] = []

    def make(**kwargs: Any) -> RelayProcess:
        assert cartrack.url is not None
        relay = RelayProcess(tmp_path, cartrack.url, **kwargs)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()
    for relay in made:
        output = relay.all_output()
        assert API_KEY not in output, "the Cartrack API key reached a log line"
        assert TOKEN not in output, "a Frotcom token reached a log line"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket, as systemd's $NOTIFY_SOCKET (short path: 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = f"{directory}/notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        try:
            yield sock, path
        finally:
            sock.close()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event of the test, at any level, as captured dicts."""
    wrapper = structlog.get_config()["wrapper_class"]
    with capture_logs() as entries:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        try:
            yield entries
        finally:
            structlog.configure(wrapper_class=wrapper)


def position(
    ts: str = "2023-10-25T16:29:31.087Z",
    lat: float = 41.40338,
    lon: float = 2.17803,
    speed: float = 45.0,
    ignition: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One Frotcom position, valid unless told otherwise."""
    raw: dict[str, Any] = {
        "Timestamp": ts,
        "Latitude": lat,
        "Longitude": lon,
        "Speed": speed,
        "Direction": 20.0,
        "Ignition": ignition,
    }
    raw.update(extra)
    return raw


def batch(*messages: tuple[str | int, list[dict[str, Any]]]) -> dict[str, Any]:
    """A Frotcom PVT body from (VehicleID, positions) pairs."""
    return {
        "PvtMessages": [
            {"VehicleID": vid, "LicensePlate": f"AA-{vid}", "Positions": list(positions)}
            for vid, positions in messages
        ]
    }


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config like a user's TOML would, with test-sized intervals.

    Keyword arguments are sections to merge, e.g. ``make_config(retry={"max_seconds": 1})``.
    """

    def make(url: str = "http://127.0.0.1:9/api/data/ingest/telematics", **sections: Any) -> Config:
        data: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_seconds": 5},
            "frotcom": {"tokens": [TOKEN]},
            "cartrack": {"url": url, "api_key": API_KEY, "timeout_seconds": 2, "concurrency": 8},
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            "retry": {"initial_seconds": 0.01, "max_seconds": 0.05},
            "vehicles": {"9876543": VIN, "1111111": VIN2},
        }
        for name, values in sections.items():
            if name == "vehicles":
                data["vehicles"] = values
            else:
                data.setdefault(name, {}).update(values)
        return parse_config(data, env={}, cwd=tmp_path)

    return make


@pytest.fixture
async def cartrack() -> AsyncIterator[FakeCartrack]:
    """A fake Cartrack on 127.0.0.1 that validates events and records them."""
    fake = FakeCartrack(api_key=API_KEY)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def relay(
    aiohttp_client: Callable[..., Any], make_config: Callable[..., Config], cartrack: FakeCartrack
) -> TestClient:
    """The real app, in process, delivering to the fake Cartrack."""
    config = make_config(url=cartrack.url)
    return await aiohttp_client(create_app(config, rescan_seconds=0.2))


async def post_batch(client: TestClient, body: Any, token: str = TOKEN) -> tuple[int, Any]:
    response = await client.post("/webhooks/frotcom", json=body, headers={"Authorization": token})
    return response.status, await response.json()


def rows(db: Path, where: str = "1", params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Outbox rows as an operator would see them with sqlite3."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(
            f"SELECT * FROM positions WHERE {where} ORDER BY vehicle_id, event_ts", params
        ).fetchall()
    finally:
        conn.close()


def snapshot(db: Path) -> list[tuple[Any, ...]]:
    """Every stored row, to prove a command changed nothing."""
    conn = sqlite3.connect(db)
    try:
        return [
            *conn.execute("SELECT * FROM positions ORDER BY id"),
            *conn.execute("SELECT * FROM quarantine ORDER BY id"),
        ]
    finally:
        conn.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition that has no event to wait on (e.g. rows in another process's DB)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


# The outbox's own tests run at a fixed time: shortly after the positions of position().
NOW = "2023-10-25T16:30:00.000Z"
NOW_MS = parse_timestamp(NOW)


class Clock:
    def __init__(self, ms: int = NOW_MS) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def outbox(db_path: Path, clock: Clock) -> AsyncIterator[Outbox]:
    box = await Outbox.open(db_path, clock)
    try:
        yield box
    finally:
        await box.close()


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
