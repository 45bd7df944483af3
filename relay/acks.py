"""Acknowledgements: rows Cartrack accepted, marked sent in batches by one task.

Marking each row sent as it is delivered would be a write transaction per event. The
forwarder's lanes hand accepted rows to ``Acks`` instead, and its flusher marks them
sent at most ACK_FLUSH_SECONDS after Cartrack accepted them, or as soon as ACK_BATCH of
them wait. Fewer, bigger transactions: every commit rewrites the pages it touched in
the WAL and waits for fsync, and rows of one vehicle share pages. The price: a crash
re-sends up to this window of events, which Cartrack absorbs by ``provider_event_id``
(it answers 409). Until their batch commits the rows still read as pending; lanes skip
the ones in ``unacked``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter

from relay.outbox.storage import Outbox
from relay.repeats import RepeatLog
from relay.timeutil import sleep_unless

ACK_FLUSH_SECONDS = 0.05
ACK_BATCH = 2000


class Acks:
    """Delivered rows not yet recorded as sent, and the task that records them."""

    def __init__(
        self,
        outbox: Outbox,
        stopping: asyncio.Event,
        stats: Counter[str],
        failures: RepeatLog,
        retry_seconds: float,
    ) -> None:
        self.outbox = outbox
        self.stats = stats
        self.failures = failures
        self.retry_seconds = retry_seconds  # between attempts while the disk refuses
        self.pending: list[tuple[int, int | None]] = []  # (row id, Cartrack's status)
        self.unacked: set[int] = set()  # delivered, and still pending in the outbox
        self._stopping = stopping
        self._ready = asyncio.Event()
        self._full = asyncio.Event()  # ACK_BATCH acks wait, or stopping: flush now

    def add(self, row_id: int, status: int | None) -> None:
        """Cartrack accepted this row: record it as sent with the next batch."""
        self.pending.append((row_id, status))
        self.unacked.add(row_id)
        self._ready.set()
        if len(self.pending) >= ACK_BATCH:
            self._full.set()

    def hurry(self) -> None:
        """Stopping: flush what waits now, not at the end of its window."""
        self._full.set()

    def wake(self) -> None:
        """Let the flusher look again (the lanes are done: it may return)."""
        self._ready.set()

    async def flush(self) -> None:
        """Record what waits as sent now."""
        if self.pending:
            await self._flush_once()

    async def run(self) -> None:
        """The flusher; returns once stopping (the forwarder flushes what comes after)."""
        while True:
            await self._ready.wait()
            if len(self.pending) < ACK_BATCH and not self._stopping.is_set():
                await sleep_unless(self._full, ACK_FLUSH_SECONDS)
            self._ready.clear()
            self._full.clear()
            if self.pending:
                try:
                    await self._flush_once()
                except sqlite3.OperationalError as exc:
                    # Rows stay pending and excluded from lanes; try again shortly.
                    self.stats["storage_errors"] += 1
                    # Retried every retry.initial_seconds while the disk stays full:
                    # the first line in full, then one summary per window.
                    self.failures.log(
                        "error",
                        "ack_flush_failed",
                        ("error",),
                        error=str(exc),
                        rows=len(self.pending),
                    )
                    if await sleep_unless(self._stopping, self.retry_seconds):
                        return
                    self._ready.set()
            if self._stopping.is_set():
                return

    async def _flush_once(self) -> None:
        acks, self.pending = self.pending, []
        try:
            await self.outbox.mark_sent(acks)
            self.stats["ack_flushes"] += 1
        except BaseException:
            self.pending[:0] = acks
            raise
        self.unacked.difference_update(row_id for row_id, _ in acks)
