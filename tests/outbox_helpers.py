"""Shared by the outbox's tests: a fixed clock, a vehicle map, and readers of the file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from conftest import NOW_MS, VIN, VIN2, batch, position, rows, wait_until

from relay.mapping import ParsedBatch, parse_batch
from relay.outbox.storage import Outbox, StoreResult
from relay.timeutil import format_ms

MAX_FUTURE_MS = 86_400_000
VEHICLES = {"9876543": VIN, "1111111": VIN2}


def parsed(body: dict[str, Any], now_ms: int = NOW_MS) -> ParsedBatch:
    return parse_batch(body, now_ms, MAX_FUTURE_MS)


async def store(
    box: Outbox,
    body: dict[str, Any],
    vehicles: dict[str, str] = VEHICLES,
    received_ms: int = NOW_MS,
) -> StoreResult:
    return await box.store_batch(parsed(body, received_ms), vehicles, "frotcom", received_ms)


def table(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def ts(second: int) -> str:
    return f"2023-10-25T16:29:{second:02d}.000Z"


def types(db: Path, vehicle_id: str = "9876543") -> list[tuple[str, str]]:
    return [(r["event_ts"], r["event_type"]) for r in rows(db, "vehicle_id = ?", (vehicle_id,))]


def big_batch(n: int = 1500) -> dict[str, Any]:
    stamps = [format_ms(NOW_MS - 3_600_000 + i * 1000) for i in range(n)]
    return batch(
        ("9876543", [position(s, ignition=i % 7 == 0) for i, s in enumerate(stamps)]),
        ("5555555", [position(stamps[0])]),
        ("9876543", [position(stamps[0], lat=-100)]),
    )


def statements(box: Outbox) -> list[str]:
    """Every statement the writer connection runs from now on (BEGIN, COMMIT, ...)."""
    seen: list[str] = []
    box._conn._conn.set_trace_callback(seen.append)
    return seen


async def in_one_group(
    box: Outbox, *writes: Awaitable[Any], return_exceptions: bool = False
) -> tuple[list[Any], list[str]]:
    """Run ``writes`` so that all of them wait behind a held writer: one group.

    Jobs that arrive while a group runs go into the next one together. Holding the
    writer's thread inside a job until every write is queued makes that grouping
    certain rather than a matter of timing. Returns the writes' outcomes and the
    statements of their group.
    """
    started, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    holder = asyncio.ensure_future(box._write(hold))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        seen = statements(box)
        tasks = [asyncio.ensure_future(w) for w in writes]
        await wait_until(lambda: len(box._group._queue) >= len(tasks))
    finally:
        release.set()
        await holder
    results = await asyncio.gather(*tasks, return_exceptions=return_exceptions)
    assert seen[0] == "COMMIT"  # the holder's
    return results, seen[1:]
