"""The daemon's outbox: writes through the group-commit writer, reads beside it.

Every write is a job for relay.outbox.writer, which commits the jobs of all waiting
callers in one transaction in its own thread, and answers each caller only after that
COMMIT: a webhook's 200 still means its rows are on disk. Jobs here prepare what they
can on the event loop (events, JSON) and keep the SQL to a few multi-row statements.

Reads that feed the forwarder use a second connection, on the loop: under WAL they
see committed rows only and never wait for the writer. The CLI opens the same file
with its own connection; WAL plus the busy timeout let both work at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from relay.frotcom import Batch
from relay.outbox.batch import StoreResult, batch_job
from relay.outbox.connection import WriterConnection, writer_database
from relay.outbox.schema import BUSY_TIMEOUT_MS, OutboxError, connect, status_counts
from relay.outbox.states import VehicleStates
from relay.outbox.writer import WRITER_AUTOCHECKPOINT_PAGES, GroupWriter, chunks, padded_in
from relay.timeutil import Clock, format_ms, system_clock

_CHUNK = 500  # bound on SQL variables per statement
# Rows one statement of hold_vehicle or release_held changes at most. The writer keeps
# SQLite's statement journals in memory (writer_pragmas), and a statement's journal
# holds every page it changes that existed before it: one UPDATE over a vehicle's
# whole backlog took ~440 MB of memory for 100,000 rows spread through a 1M-row outbox.
ROWS_PER_UPDATE = 500
_HOLD = (
    "UPDATE positions SET status = 'held', updated_at = ? WHERE id IN (SELECT id"
    " FROM positions WHERE status = 'pending' AND vehicle_id = ? LIMIT ?)"
)
_RELEASE = (
    "UPDATE positions SET status = 'pending', updated_at = ? WHERE id IN (SELECT id"
    " FROM positions WHERE status = 'held' AND vehicle_id = ? LIMIT ?)"
)
WRITER_CACHE_KIB = 32 * 1024

# Vehicles with pending rows, as a loose index scan in one statement: each step seeks
# the next vehicle_id in the partial index instead of reading every pending row.
# INDEXED BY: without statistics SQLite may prefer another index over status and
# sort every pending row (measured: 25 s for 200k rows over 500 vehicles). One
# statement rather than one query per vehicle: 2,000 vehicles over 200k pending rows
# took 602 ms as separate queries through the writer thread, 11 ms like this.
PENDING_VEHICLES = """
WITH RECURSIVE v(vehicle_id) AS (
    SELECT (SELECT min(vehicle_id) FROM positions INDEXED BY positions_pending
            WHERE status = 'pending')
    UNION ALL
    SELECT (SELECT min(vehicle_id) FROM positions INDEXED BY positions_pending
            WHERE status = 'pending' AND vehicle_id > v.vehicle_id)
    FROM v WHERE v.vehicle_id IS NOT NULL
)
SELECT vehicle_id FROM v WHERE vehicle_id IS NOT NULL
"""


# The writer's statements come in writer.SIZES, some dozens of texts besides the
# upserts of vehicle states; Python's default cache of 128 would be tight.
WRITER_CACHED_STATEMENTS = 256


def writer_pragmas() -> list[str]:
    """The PRAGMAs the daemon's writer connection starts with (bench.storage's too)."""
    return [
        f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
        # FULL: a commit that acknowledged Frotcom survives an OS crash or power loss.
        "PRAGMA synchronous = FULL",
        # Marking rows sent touches a page per row, scattered over the table and its
        # indexes; fewer of them are read again with a bigger cache (measured on a 50k
        # backlog: ~35 us per row marked with SQLite's default 2 MiB, ~26 us with 64).
        # 32 MiB keeps the relay under its memory budget with a 1M-row outbox.
        f"PRAGMA cache_size = -{WRITER_CACHE_KIB}",
        # WAL checkpoints run beside the writer (relay.outbox.writer), not inside its
        # COMMIT where every waiting webhook would wait for them too; the writer's own,
        # past WRITER_AUTOCHECKPOINT_PAGES, copies what they left and lets the WAL
        # start over, which under steady load they never can.
        f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}",
        # Statement journals in memory, not in temporary files. The json_valid CHECKs
        # make SQLite keep one for every multi-row INSERT (a function in a CHECK might
        # abort it half way): a copy of each page the statement changes that existed
        # before it. Past 64 KiB that went to a file made, written and deleted in
        # /var/tmp inside the group (traced at 8 senders: half of the groups).
        # Alternating (23 Nov): 8 senders 49.7k against 47.8k positions/s (ahead in 6
        # of 8 pairs), 24.4 against 25.7 ms of CPU per 1,000; 32 senders 65.4k against
        # 58.7k (4 of 4), 19.4 against 21.7 ms; forwarding at c=64 even (17.0k against
        # 16.8k events/s) at 5% less CPU per event. The memory a journal takes is as
        # big as its statement's changes: every statement of the writer changes a
        # bounded number of rows (writer.ROWS_PER_STATEMENT, ROWS_PER_UPDATE, the
        # forwarder's ACK_BATCH, purge_sent's chunk), and must go on doing so.
        "PRAGMA temp_store = MEMORY",
    ]


class LowDiskSpace(OSError):
    """The outbox's filesystem is below ``outbox.min_free_bytes``: refuse before writing."""

    def __init__(self, path: Path, free: int, minimum: int) -> None:
        super().__init__(errno.ENOSPC, f"{free} bytes free, below min_free_bytes={minimum}")
        self.path = path
        self.free = free
        self.minimum = minimum


def free_bytes(path: Path) -> int:
    """Space an unprivileged writer can still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# Not frozen: the forwarder makes one per row it sends, and a frozen dataclass's
# __init__ sets each field through object.__setattr__ (0.9 us a row, a third of next_rows).
@dataclass(slots=True)
class OutboxRow:
    id: int
    vehicle_id: str
    event_ts: str
    attempts: int
    next_attempt_at: str
    payload: str


class Outbox:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        clock: Clock,
        min_free_bytes: int = 0,
        reader: sqlite3.Connection | None = None,
    ) -> None:
        # The writer connection, used by the writer's thread; tests reach it as ``_conn``
        # to set per-connection PRAGMAs while no write is under way.
        self._conn = conn
        # Vehicle states as committed, so that webhook groups need not read them.
        self._states = VehicleStates()
        self._group = GroupWriter(conn, _open_checkpointer(path), self._states)
        self._write = self._group.write
        self._reader = reader if reader is not None else _open_reader(path)
        self.path = path
        self.clock = clock
        self.min_free_bytes = min_free_bytes

    @classmethod
    async def open(cls, path: Path, clock: Clock = system_clock, min_free_bytes: int = 0) -> Outbox:
        # Validation and migration run once, synchronously, before the daemon serves.
        def prepare() -> None:
            connect(path, create=True).close()

        await asyncio.to_thread(prepare)
        try:
            # check_same_thread: groups run in the writer's thread, the PRAGMAs below
            # and close() in aiosqlite's, never at the same time.
            database, uri = writer_database(path)
            conn = await aiosqlite.connect(
                database,
                uri=uri,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=WRITER_CACHED_STATEMENTS,
                factory=WriterConnection,
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open: {exc}") from None
        for pragma in writer_pragmas():
            await conn.execute(pragma)
        try:
            reader = _open_reader(path)
        except sqlite3.Error as exc:
            await conn.close()
            raise OutboxError(f"{path}: cannot open: {exc}") from None
        return cls(conn, path, clock, min_free_bytes, reader)

    async def watch_writer(self) -> None:
        """Raise when the writer's thread has died (see GroupWriter.watch)."""
        await self._group.watch()

    async def close(self) -> None:
        await self._group.close()
        self._reader.close()
        await self._conn.close()

    def now(self) -> str:
        return format_ms(int(self.clock() * 1000))

    def check_free_space(self) -> None:
        """Raise LowDiskSpace when new rows could run the filesystem full.

        SQLite rolls back cleanly on SQLITE_FULL, but only after the request did all
        its work, and a full disk can also fail the WAL checkpoint; refusing early
        keeps headroom for the forwarder's status updates and for recovery.
        """
        if self.min_free_bytes <= 0:
            return
        free = free_bytes(self.path.parent)
        if free < self.min_free_bytes:
            raise LowDiskSpace(self.path, free, self.min_free_bytes)

    # -- ingest ------------------------------------------------------------------------

    async def store_batch(
        self,
        batch: Batch,
        vehicles: Mapping[str, str],
        provider: str,
        received_ms: int,
    ) -> StoreResult:
        """Store one request's positions and quarantined input in one transaction."""
        self.check_free_space()
        return await self._write(batch_job(batch, vehicles, provider, received_ms, self._states))

    # -- forwarding ----------------------------------------------------------------------

    async def pending_vehicles(self) -> list[str]:
        """Vehicles with pending rows, in VehicleID order."""
        return [row[0] for row in self._reader.execute(PENDING_VEHICLES)]

    async def next_rows(
        self, vehicle_id: str, limit: int, skip: Sequence[int] = ()
    ) -> list[OutboxRow]:
        """A vehicle's oldest pending rows, in the order Cartrack must see them.

        ``skip``: rows not to return (delivered, their ack not written yet); passed over
        in SQLite's index walk rather than read and built into rows to be dropped.
        """
        # On the loop, through the reader: one indexed range read, committed rows only.
        cursor = self._reader.execute(
            "SELECT id, vehicle_id, event_ts, attempts, next_attempt_at, payload FROM positions"
            " WHERE status = 'pending' AND vehicle_id = ?"
            f"{_not_in(len(skip))} ORDER BY event_ts, id LIMIT ?",
            (vehicle_id, *skip, limit),
        )
        return [OutboxRow(*row) for row in cursor]

    async def mark_sent(self, acks: Iterable[tuple[int, int | None]]) -> None:
        """Mark delivered rows in one transaction (acks are batched by the forwarder)."""
        now = self.now()
        by_status: dict[int | None, list[int]] = {}
        for row_id, status in acks:
            by_status.setdefault(status, []).append(row_id)

        def work(conn: sqlite3.Connection) -> None:
            # One statement per few hundred rows instead of one per row (nearly every
            # ack carries the same HTTP status), so it can run in the writer's thread:
            # each row costs SQLite its table page and two index entries (measured
            # 8-40 us, the less the more rows of one vehicle share pages), which then
            # runs beside the event loop instead of on it.
            for status, ids in by_status.items():
                for chunk in chunks(ids, _CHUNK):
                    padded = padded_in(chunk)  # a few statement texts, each prepared once
                    conn.execute(
                        "UPDATE positions SET status = 'sent', sent_at = ?, updated_at = ?,"
                        " attempts = attempts + 1, last_status = ?, last_error = NULL"
                        f" WHERE id IN ({','.join('?' * len(padded))})"
                        # 'held' too: a vehicle unmapped while its event was in flight has
                        # still been delivered, and must not be re-sent on release.
                        " AND (status = 'pending' OR status = 'held')",
                        (now, now, status, *padded),
                    )

        await self._write(work)

    async def mark_retry(
        self, row_id: int, next_attempt_at: str, status: int | None, error: str
    ) -> None:
        await self._update(
            "UPDATE positions SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?,"
            " last_error = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
            (next_attempt_at, status, error, self.now(), row_id),
        )

    async def mark_failed(self, row_id: int, status: int | None, error: str) -> None:
        await self._update(
            "UPDATE positions SET status = 'failed', attempts = attempts + 1, last_status = ?,"
            " last_error = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
            (status, error, self.now(), row_id),
        )

    async def hold_vehicle(self, vehicle_id: str) -> int:
        """Park a vehicle's pending rows: its VIN left the vehicle map."""
        now = self.now()

        def work(conn: sqlite3.Connection) -> int:
            return _update_in_chunks(conn, _HOLD, (now, vehicle_id))

        return await self._write(work)

    async def release_held(self, vehicle_ids: Iterable[str]) -> dict[str, int]:
        """Held rows of now-mapped vehicles become pending; returns counts by vehicle."""
        now = self.now()
        ids = sorted(set(vehicle_ids))

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            released: dict[str, int] = {}
            for chunk in chunks(ids, _CHUNK):
                marks = ",".join("?" * len(chunk))
                for vid, n in conn.execute(
                    f"SELECT vehicle_id, count(*) FROM positions WHERE status = 'held'"
                    f" AND vehicle_id IN ({marks}) GROUP BY vehicle_id",
                    chunk,
                ):
                    released[vid] = n
            for vid in released:
                _update_in_chunks(conn, _RELEASE, (now, vid))
            return released

        return await self._write(work)

    async def purge_sent(self, before: str, chunk: int = 5000) -> int:
        """Delete sent rows last updated before ``before``, in short transactions."""
        total = 0
        while True:
            deleted = await self._update(
                "DELETE FROM positions WHERE id IN (SELECT id FROM positions"
                " INDEXED BY positions_done WHERE status = 'sent' AND updated_at < ? LIMIT ?)",
                (before, chunk),
            )
            total += deleted
            if deleted < chunk:
                return total

    async def set_state(self, key: str, value: str | None) -> None:
        await self._update(
            "INSERT INTO relay_state (key, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, value, self.now()),
        )

    async def clear_state(self, key: str) -> None:
        await self._update("DELETE FROM relay_state WHERE key = ?", (key,))

    async def counts(self) -> dict[str, int]:
        """Rows by status: pending, held, sent, failed (committed rows only)."""

        # Every status's partial index, read off the loop on a connection of its own:
        # it neither waits for the writer nor holds up a group.
        def count() -> dict[str, int]:
            conn = connect(self.path, readonly=True)
            try:
                return status_counts(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(count)

    async def check_writable(self) -> None:
        """Raise if a write transaction cannot be started (for readiness)."""
        await self._write(_noop)

    async def _update(self, sql: str, params: Sequence[Any]) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._write(work)


def _open_checkpointer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")  # the database file is synced after copying
    return conn


def _open_reader(path: Path) -> sqlite3.Connection:
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    reader.execute("PRAGMA query_only = 1")
    return reader


def _update_in_chunks(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
    """Run ``sql`` (an UPDATE of up to its last parameter's rows) until it changes fewer.

    In the caller's transaction: the whole change still commits or rolls back as one.
    """
    total = 0
    while True:
        changed = conn.execute(sql, (*params, ROWS_PER_UPDATE)).rowcount
        total += changed
        if changed < ROWS_PER_UPDATE:
            return total


def _not_in(count: int) -> str:
    # The lane's own unflushed acks: at most a few batches, well under _CHUNK.
    return f" AND id NOT IN ({','.join('?' * count)})" if count else ""


def _noop(conn: sqlite3.Connection) -> None:
    return None
