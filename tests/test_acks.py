"""relay.acks against a real outbox: delivered rows are recorded as sent in batches."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import batch, position, rows, wait_until
from outbox_helpers import store, ts

from relay import acks as acks_module
from relay.acks import Acks
from relay.outbox.storage import Outbox
from relay.repeats import RepeatLog, RepeatSummariser


@pytest.fixture
async def stored(outbox: Outbox, db_path: Path) -> list[int]:
    """Ids of five pending rows of one vehicle."""
    await store(outbox, batch(("9876543", [position(ts(s)) for s in range(5)])))
    return [r["id"] for r in rows(db_path)]


@pytest.fixture
async def running(outbox: Outbox) -> AsyncIterator[tuple[Acks, asyncio.Event]]:
    stopping = asyncio.Event()
    acks = Acks(outbox, stopping, Counter(), _failures(), retry_seconds=0.01)
    task = asyncio.create_task(acks.run())
    try:
        yield acks, stopping
    finally:
        stopping.set()
        acks.hurry()
        acks.wake()
        await asyncio.wait_for(task, 5)


def _failures() -> RepeatLog:
    return RepeatLog(structlog.get_logger("test"), "summary", RepeatSummariser())


def statuses(db: Path) -> dict[int, str]:
    return {r["id"]: r["status"] for r in rows(db)}


async def test_acks_of_one_window_are_marked_sent_in_one_transaction(
    running: tuple[Acks, asyncio.Event], stored: list[int], db_path: Path
) -> None:
    acks, _ = running
    for row_id in stored:
        acks.add(row_id, 201)
    assert acks.unacked == set(stored)  # delivered, still pending in the file
    await wait_until(lambda: set(statuses(db_path).values()) == {"sent"})
    assert acks.stats["ack_flushes"] == 1
    assert acks.unacked == set()
    assert {r["last_status"] for r in rows(db_path)} == {201}


async def test_a_full_batch_is_flushed_without_waiting_for_the_window(
    outbox: Outbox, stored: list[int], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acks_module, "ACK_FLUSH_SECONDS", 3600.0)
    monkeypatch.setattr(acks_module, "ACK_BATCH", 3)
    stopping = asyncio.Event()
    acks = Acks(outbox, stopping, Counter(), _failures(), retry_seconds=0.01)
    task = asyncio.create_task(acks.run())
    try:
        for row_id in stored[:3]:
            acks.add(row_id, 200)
        await wait_until(lambda: list(statuses(db_path).values()).count("sent") == 3)
        acks.add(stored[3], 200)  # below the batch: waits for its window
        await asyncio.sleep(0)
        assert statuses(db_path)[stored[3]] == "pending"
    finally:
        stopping.set()
        acks.hurry()
        await asyncio.wait_for(task, 5)
    await acks.flush()  # what the forwarder does once its lanes are done
    assert [statuses(db_path)[i] for i in stored] == ["sent"] * 4 + ["pending"]


async def test_a_failed_flush_keeps_the_acks_and_tries_again(
    running: tuple[Acks, asyncio.Event],
    stored: list[int],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acks, _ = running
    real = Outbox.mark_sent
    calls: list[int] = []

    async def locked_twice(self: Outbox, marks: Any) -> None:
        calls.append(len(marks := list(marks)))
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        await real(self, marks)

    monkeypatch.setattr(Outbox, "mark_sent", locked_twice)
    acks.add(stored[0], 200)
    acks.add(stored[1], 200)
    await wait_until(lambda: statuses(db_path)[stored[1]] == "sent")
    assert calls == [2, 2, 2]  # the same two rows each time, nothing lost or doubled
    assert acks.stats["storage_errors"] == 2
    assert acks.unacked == set()
