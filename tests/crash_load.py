"""The load side of the crash harness: Frotcom stand-ins and a Cartrack that can be watched.

``Senders`` post batches of unique positions (unique VehicleID + Timestamp) and re-send
a failed batch until it gets its 200, as Frotcom does; they record what they sent and
what was acknowledged. ``TrackingCartrack`` is the FakeCartrack with a counter of
requests in progress and a ``Trigger`` that runs an action (a SIGKILL) synchronously at
the n-th arrival, before the relay reads the answer. ``read_outbox`` looks at a dead
relay's file without disturbing it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from conftest import API_KEY, TOKEN, position

from relay.devtools.fake_cartrack import FakeCartrack

PROVIDER = "frotcom"
# Six vehicles: more lanes than one, fewer than cartrack.concurrency, so the semaphore
# and the per-vehicle order both matter.
VEHICLES = {
    "700001": "WDB9634031L000001",
    "700002": "WDB9634031L000002",
    "700003": "WDB9634031L000003",
    "700004": "WDB9634031L000004",
    "700005": "WDB9634031L000005",
    "700006": "WDB9634031L000006",
}
# Far in the past: Cartrack rejects future events, and nothing else cares about age.
BASE_MS = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
CONCURRENCY = 8
SENDERS = 4
STEP_TIMEOUT = 20.0  # any one wait of the kill loop; a stuck relay fails, not hangs


def event_id(vehicle_id: str, ts_ms: int) -> str:
    return f"{PROVIDER}:{vehicle_id}:{iso_ms(ts_ms)}"


def iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def read_outbox(db: Path) -> tuple[str, dict[str, str]]:
    """(integrity_check result, provider_event_id -> status), read-only.

    Read-only so that closing this connection does not checkpoint the WAL: the next
    relay start must find the file exactly as the kill left it.
    """
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        integrity = "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        statuses = dict(conn.execute("SELECT provider_event_id, status FROM positions"))
    finally:
        conn.close()
    return integrity, statuses


class Trigger:
    """Calls ``action`` once, synchronously, when the ``n``-th tick since ``arm`` happens."""

    def __init__(self) -> None:
        self.remaining = 0
        self.action: Callable[[], None] | None = None
        self.fired = asyncio.Event()

    def arm(self, n: int, action: Callable[[], None]) -> None:
        self.remaining, self.action = n, action
        self.fired.clear()

    def tick(self) -> None:
        if self.action is None:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            action, self.action = self.action, None
            action()
            self.fired.set()


class TrackingCartrack(FakeCartrack):
    """The fake Cartrack, counting requests in progress and able to act on each arrival."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(api_key=API_KEY, vins=set(VEHICLES.values()), **kwargs)
        self.in_flight = 0
        self.on_delivery = Trigger()
        self.on_request = lambda _: self.on_delivery.tick()

    def idle(self) -> bool:
        """No request being handled and no connection open (the relay's died with it)."""
        # aiohttp forgets a closed connection only once its handler finished, so a dead
        # process's last request is either recorded or dropped by the time this holds.
        server = self._runner.server if self._runner is not None else None
        return self.in_flight == 0 and (server is None or not server.connections)

    async def _handle(self, request: Any) -> Any:
        self.in_flight += 1
        try:
            return await super()._handle(request)
        finally:
            self.in_flight -= 1


@dataclass
class Senders:
    """Frotcom stand-ins: post unique positions, re-send a batch until it gets its 200."""

    rng: random.Random
    count: int = SENDERS
    max_batches: int = 100_000
    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    on_ack: Trigger = field(default_factory=Trigger)
    url: str | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _ts: itertools.count[int] = field(default_factory=itertools.count)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _acked_batches: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)

    def serving(self, url: str) -> None:
        self.url = url
        self.up.set()

    def down(self) -> None:
        self.up.clear()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(self.count)]

    async def stop(self) -> None:
        """Let every sender finish the request it has out, then end."""
        self._stopping = True
        self.up.set()  # a sender waiting for the relay gives up instead
        await asyncio.gather(*self._tasks)

    def make_batch(self) -> tuple[dict[str, Any], list[str]]:
        messages, ids = [], []
        for vehicle_id in self.rng.sample(sorted(VEHICLES), self.rng.randint(1, 3)):
            points = []
            for _ in range(self.rng.randint(1, 12)):
                ts_ms = BASE_MS + next(self._ts) * 1000 + self.rng.randrange(1000)
                points.append(position(ts=iso_ms(ts_ms), ignition=self.rng.random() < 0.7))
                ids.append(event_id(vehicle_id, ts_ms))
            messages.append(
                {"VehicleID": vehicle_id, "LicensePlate": f"AA-{vehicle_id}", "Positions": points}
            )
        return {"PvtMessages": messages}, ids

    async def _run(self, index: int) -> None:
        timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(self.max_batches):
                if self._stopping:
                    return
                if self._acked_batches and self.rng.random() < 0.05:
                    # Frotcom re-sends a batch it already got a 200 for (its timeout was
                    # shorter than our answer): no new row, no second delivery.
                    body, ids = self.rng.choice(self._acked_batches)
                else:
                    body, ids = self.make_batch()
                self.attempted.update(ids)
                while not await self._post(session, body, ids):
                    await self.up.wait()
                    if self._stopping:
                        return

    async def _post(self, session: aiohttp.ClientSession, body: Any, ids: list[str]) -> bool:
        await self.up.wait()
        if self._stopping or self.url is None:
            return True
        try:
            async with session.post(
                self.url, json=body, headers={"Authorization": TOKEN}
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[type(exc).__name__] += 1
            # The relay died under this request: wait for the next one to come up.
            if self.up.is_set():
                await asyncio.sleep(0.05)
            return False
        self.outcomes[str(status)] += 1
        if status != 200:
            await asyncio.sleep(0.05)
            return False
        self.acked.update(ids)
        if len(self._acked_batches) < 200:
            self._acked_batches.append((body, ids))
        self.on_ack.tick()
        return True
