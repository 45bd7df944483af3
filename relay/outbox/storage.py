"""The daemon's outbox: group commit through one writer connection, reads beside it.

Writes are *jobs* (plain functions of a ``sqlite3.Connection``). Jobs that arrive while
a commit is on its way to disk wait, and then go in together: one ``BEGIN IMMEDIATE``,
each job in its own savepoint, one ``COMMIT`` (one fsync) for all of them. Every
caller still gets its answer only after that COMMIT, so a webhook's 200 still means
its rows are on disk; a job that fails rolls back its savepoint alone.

BEGIN and COMMIT (which may wait for the lock or the disk) run in the writer
connection's thread; the jobs' statements run on the event loop. Measured: a thread
that executes one statement per row stalls on the GIL against a busy event loop
(2-20x slower), while a statement on the loop is a few microseconds per row.

Reads that feed the forwarder use a second connection, on the loop: under WAL they
see committed rows only and never wait for the writer. The CLI opens the same file
with its own connection; WAL plus the busy timeout let both work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from relay.mapping import ParsedBatch, VehicleState, build_event, next_event_type
from relay.outbox.schema import BUSY_TIMEOUT_MS, OutboxError, connect
from relay.timeutil import Clock, format_ms, parse_timestamp, system_clock

T = TypeVar("T")
_CHUNK = 500  # bound on SQL variables per statement
WRITER_CACHE_KIB = 32 * 1024

# Vehicles with pending rows, as a loose index scan in one statement: each step seeks
# the next vehicle_id in the partial index instead of reading every pending row.
# INDEXED BY: without statistics SQLite prefers the (status, updated_at) index and
# sorts every pending row (measured: 25 s for 200k rows over 500 vehicles). One
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


@dataclass(frozen=True, slots=True)
class StoreResult:
    accepted: int
    duplicates: int
    held: int
    quarantined: int
    vehicles: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    vehicle_id: str
    event_ts: str
    attempts: int
    next_attempt_at: str
    payload: str


def _dumps(value: Any) -> str:
    # orjson: the same compact JSON (only tiny exponents are spelled 1e-7, not 1e-07),
    # a fifth of the time on the ingest path.
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # text that is not UTF-8 (a lone surrogate)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=False)


def _dumps_input(value: Any) -> str:
    # Frotcom's JSON may carry lone surrogates ("\ud800"), which Python decodes but
    # cannot encode as UTF-8 for SQLite; escaped ASCII keeps every input storable.
    return json.dumps(value, separators=(",", ":"))


def fingerprint(vehicle_id: str | None, raw: Any) -> str:
    canonical = json.dumps([vehicle_id, raw], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(eq=False, slots=True)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    offloop: bool  # long jobs (purge, release) run in the writer's thread


class _TransactionLost(Exception):
    """SQLite rolled the whole transaction back on its own (I/O error, disk full)."""


class Outbox:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        clock: Clock,
        min_free_bytes: int = 0,
        reader: sqlite3.Connection | None = None,
    ) -> None:
        # The writer connection; tests and other modules reach it as ``_conn`` (to set
        # per-connection PRAGMAs), and a read through it holds ``_lock``.
        self._conn = conn
        self._lock = asyncio.Lock()
        self._reader = reader if reader is not None else _open_reader(path)
        self._queue: list[_Job] = []
        self._writer: asyncio.Task[None] | None = None
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
            # check_same_thread: the jobs' statements run on the loop, BEGIN/COMMIT in
            # aiosqlite's thread; the writer task makes sure never both at once.
            conn = await aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open: {exc}") from None
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # FULL: a commit that acknowledged Frotcom survives an OS crash or power loss.
        await conn.execute("PRAGMA synchronous = FULL")
        # Marking rows sent touches a page per row, scattered over the table and its
        # indexes; fewer of them are read again with a bigger cache (measured on a 50k
        # backlog: ~35 us per row marked with SQLite's default 2 MiB, ~26 us with 64).
        # 32 MiB keeps the relay under its memory budget with a 1M-row outbox.
        await conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        try:
            reader = _open_reader(path)
        except sqlite3.Error as exc:
            await conn.close()
            raise OutboxError(f"{path}: cannot open: {exc}") from None
        return cls(conn, path, clock, min_free_bytes, reader)

    async def close(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.gather(self._writer, return_exceptions=True)
        async with self._lock:
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

    # -- group commit ------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], T], *, offloop: bool = False) -> T:
        """Run ``work`` in a write transaction; returns once that transaction committed."""
        job = _Job(work, asyncio.get_running_loop().create_future(), offloop)
        self._queue.append(job)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups(), name="outbox-writer")
        result: T = await job.future
        return result

    async def _write_groups(self) -> None:
        while self._queue:
            async with self._lock:
                await self._commit_group()

    async def _commit_group(self) -> None:
        raw = self._conn._conn
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            jobs, self._queue = self._queue, []
            _settle([(job, exc) for job in jobs])
            if not isinstance(exc, Exception):
                raise
            return
        # Everything queued while we waited for the lock goes into this transaction.
        jobs, self._queue = self._queue, []
        outcomes: list[tuple[_Job, Any]] = []
        try:
            for n, job in enumerate(jobs):
                if job.future.done():
                    continue  # the caller is gone (cancelled): nothing to acknowledge
                if job.offloop:
                    outcome = await asyncio.to_thread(_run_job, raw, job.work)
                else:
                    outcome = _run_job(raw, job.work)
                if isinstance(outcome, _TransactionLost):
                    # Every job so far went with the transaction; the rest try again.
                    cause = outcome.__cause__ or outcome
                    outcomes = [(j, cause) for j, _ in outcomes] + [(job, cause)]
                    self._queue[:0] = jobs[n + 1 :]
                    return
                outcomes.append((job, outcome))
            await self._conn.execute("COMMIT")
        except Exception as exc:
            # A failed COMMIT (disk full, I/O error) may already have rolled back.
            if raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
            outcomes = [(job, exc) for job in jobs]
        except BaseException as exc:
            # Cancelled (the loop is closing): COMMIT may still be running in the
            # connection's thread, so the connection is left alone.
            outcomes = [(job, exc) for job in jobs]
            raise
        finally:
            _settle(outcomes)

    # -- ingest ------------------------------------------------------------------------

    async def store_batch(
        self,
        batch: ParsedBatch,
        vehicles: Mapping[str, str],
        provider: str,
        received_ms: int,
    ) -> StoreResult:
        """Store one request's positions and quarantined input in one transaction."""
        self.check_free_space()
        received_at = format_ms(received_ms)
        positions = sorted(batch.positions, key=lambda p: (p.vehicle_id, p.ts_ms))
        vehicle_ids = sorted({p.vehicle_id for p in positions})
        # Everything that does not depend on the vehicles' stored state is prepared
        # before the transaction, so the writer holds it only for the SQL.
        prepared = []
        for p in positions:
            event = build_event(p, "PERIODIC", provider, received_at)
            # Taken from the event: formatting a timestamp again costs more than the insert.
            event_ts = event["event_ts"]
            held = p.vehicle_id not in vehicles
            prepared.append(
                (
                    p,
                    event,
                    [
                        event["source"]["provider_event_id"],
                        p.vehicle_id,
                        event_ts,
                        "PERIODIC",
                        "held" if held else "pending",
                        event_ts if event_ts > received_at else received_at,
                        received_at,
                        received_at,
                        _dumps(event),
                        _dumps_input(p.raw),
                    ],
                )
            )
        quarantined = [
            (
                received_at,
                r.vehicle_id,
                r.reason,
                _dumps_input(r.raw),
                fingerprint(r.vehicle_id, r.raw),
            )
            for r in batch.rejected
        ]

        def work(conn: sqlite3.Connection) -> StoreResult:
            states = _load_states(conn, vehicle_ids)
            pending_rows: list[Sequence[Any]] = []
            held_rows: list[Sequence[Any]] = []
            changed: dict[str, VehicleState] = {}
            for p, event, row in prepared:
                state = states.get(p.vehicle_id)
                event_type, new_state = next_event_type(state, p.ts_ms, p.ignition)
                if new_state is not state and new_state is not None:
                    states[p.vehicle_id] = changed[p.vehicle_id] = new_state
                if event_type != "PERIODIC":
                    # Same key, same place in the payload: only its value changes.
                    event["event_type"] = event_type
                    row = [*row[:3], event_type, *row[4:8], _dumps(event), row[9]]
                (held_rows if row[4] == "held" else pending_rows).append(row)
            stored_pending = _insert_count(conn, INSERT_POSITION, pending_rows)
            stored_held = _insert_count(conn, INSERT_POSITION, held_rows)
            _insert_count(conn, INSERT_QUARANTINE, quarantined)
            if changed:
                conn.executemany(
                    UPSERT_STATE,
                    [
                        (vid, format_ms(s.last_ts_ms), int(s.ignition), received_at)
                        for vid, s in changed.items()
                    ],
                )
            accepted = stored_pending + stored_held
            return StoreResult(
                accepted=accepted,
                duplicates=len(positions) - accepted,
                held=stored_held,
                quarantined=len(batch.rejected),
                vehicles=frozenset(r[1] for r in pending_rows) if stored_pending else frozenset(),
            )

        return await self._write(work)

    # -- forwarding ----------------------------------------------------------------------

    async def pending_vehicles(self) -> list[str]:
        """Vehicles with pending rows, in VehicleID order."""
        return [row[0] for row in self._reader.execute(PENDING_VEHICLES)]

    async def next_rows(self, vehicle_id: str, limit: int) -> list[OutboxRow]:
        """A vehicle's oldest pending rows, in the order Cartrack must see them."""
        # On the loop, through the reader: one indexed range read, committed rows only.
        cursor = self._reader.execute(
            "SELECT id, vehicle_id, event_ts, attempts, next_attempt_at, payload FROM positions"
            " WHERE status = 'pending' AND vehicle_id = ? ORDER BY event_ts, id LIMIT ?",
            (vehicle_id, limit),
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
            # each row costs SQLite ~50-150 us of index upkeep, which then runs beside
            # the event loop instead of on it, with one GIL handoff per statement.
            for status, ids in by_status.items():
                for chunk in _chunks(ids, _CHUNK):
                    conn.execute(
                        "UPDATE positions SET status = 'sent', sent_at = ?, updated_at = ?,"
                        " attempts = attempts + 1, last_status = ?, last_error = NULL"
                        f" WHERE id IN ({','.join('?' * len(chunk))})"
                        # 'held' too: a vehicle unmapped while its event was in flight has
                        # still been delivered, and must not be re-sent on release.
                        " AND (status = 'pending' OR status = 'held')",
                        (now, now, status, *chunk),
                    )

        await self._write(work, offloop=True)

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
        return await self._update(
            "UPDATE positions SET status = 'held', updated_at = ?"
            " WHERE status = 'pending' AND vehicle_id = ?",
            (self.now(), vehicle_id),
            offloop=True,
        )

    async def release_held(self, vehicle_ids: Iterable[str]) -> dict[str, int]:
        """Held rows of now-mapped vehicles become pending; returns counts by vehicle."""
        now = self.now()
        ids = sorted(set(vehicle_ids))

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            released: dict[str, int] = {}
            for chunk in _chunks(ids, _CHUNK):
                marks = ",".join("?" * len(chunk))
                for vid, n in conn.execute(
                    f"SELECT vehicle_id, count(*) FROM positions WHERE status = 'held'"
                    f" AND vehicle_id IN ({marks}) GROUP BY vehicle_id",
                    chunk,
                ):
                    released[vid] = n
            if released:
                conn.executemany(
                    "UPDATE positions SET status = 'pending', updated_at = ?"
                    " WHERE status = 'held' AND vehicle_id = ?",
                    [(now, vid) for vid in released],
                )
            return released

        return await self._write(work, offloop=True)

    async def purge_sent(self, before: str, chunk: int = 5000) -> int:
        """Delete sent rows last updated before ``before``, in short transactions."""
        total = 0
        while True:
            deleted = await self._update(
                "DELETE FROM positions WHERE id IN (SELECT id FROM positions"
                " WHERE status = 'sent' AND updated_at < ? LIMIT ?)",
                (before, chunk),
                offloop=True,
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

    async def counts(self) -> dict[str, int]:
        # Reads the whole status index: off the loop, through the writer's connection.
        async with (
            self._lock,
            self._conn.execute("SELECT status, count(*) FROM positions GROUP BY status") as cursor,
        ):
            counts = {"pending": 0, "held": 0, "sent": 0, "failed": 0}
            async for status, n in cursor:
                counts[status] = n
            return counts

    async def check_writable(self) -> None:
        """Raise if a write transaction cannot be started (for readiness)."""
        await self._write(_noop)

    async def _update(self, sql: str, params: Sequence[Any], *, offloop: bool = False) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._write(work, offloop=offloop)


INSERT_POSITION = (
    "INSERT OR IGNORE INTO positions (provider_event_id, vehicle_id, event_ts,"
    " event_type, status, next_attempt_at, received_at, updated_at, payload, source)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_QUARANTINE = (
    "INSERT OR IGNORE INTO quarantine (received_at, vehicle_id, reason, raw, fingerprint)"
    " VALUES (?, ?, ?, ?, ?)"
)
UPSERT_STATE = (
    "INSERT INTO vehicle_state (vehicle_id, last_ts, ignition, updated_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (vehicle_id) DO UPDATE SET"
    " last_ts = excluded.last_ts, ignition = excluded.ignition,"
    " updated_at = excluded.updated_at"
)


def _open_reader(path: Path) -> sqlite3.Connection:
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    reader.execute("PRAGMA query_only = 1")
    return reader


def _run_job(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], Any]) -> Any:
    """One job in its own savepoint: its failure undoes its writes only.

    Returns the job's result or the exception it raised; ``_TransactionLost`` when
    SQLite rolled back the whole transaction.
    """
    conn.execute("SAVEPOINT job")
    try:
        result = work(conn)
    except Exception as exc:
        if not conn.in_transaction:
            lost = _TransactionLost()
            lost.__cause__ = exc
            return lost
        try:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        except sqlite3.Error:
            lost = _TransactionLost()
            lost.__cause__ = exc
            return lost
        return exc
    conn.execute("RELEASE job")
    return result


def _settle(outcomes: Iterable[tuple[_Job, Any]]) -> None:
    for job, outcome in outcomes:
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def _insert_count(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    if not rows:
        return 0
    before = conn.total_changes
    conn.executemany(sql, rows)
    return conn.total_changes - before


def _load_states(conn: sqlite3.Connection, vehicle_ids: Sequence[str]) -> dict[str, VehicleState]:
    states: dict[str, VehicleState] = {}
    for chunk in _chunks(vehicle_ids, _CHUNK):
        marks = ",".join("?" * len(chunk))
        for vid, last_ts, ignition in conn.execute(
            f"SELECT vehicle_id, last_ts, ignition FROM vehicle_state WHERE vehicle_id IN ({marks})",
            chunk,
        ):
            states[vid] = VehicleState(parse_timestamp(last_ts), bool(ignition))
    return states


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
