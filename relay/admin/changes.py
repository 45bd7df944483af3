"""The commands that change the outbox: ``requeue`` and ``purge``.

Writes happen in short ``BEGIN IMMEDIATE`` chunks with a pause between them, so the
daemon (whose busy handler polls at most every 100 ms) always gets the lock in
between. ``--dry-run`` runs the same filter as a count and never opens a write
transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.admin.common import FilterError, open_outbox, time_window
from relay.config import Config
from relay.timeutil import Clock, format_ms, system_clock

REQUEUE_STATUSES = ("failed", "sent")
CHUNK = 10_000
# Longer than the longest sleep of SQLite's default busy handler (100 ms), so a
# daemon waiting for the write lock polls at least once between two chunks.
CHUNK_PAUSE_SECONDS = 0.11


@dataclass(frozen=True)
class RequeueResult:
    pending: int
    held: int
    held_vehicles: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.pending + self.held


# -- requeue ---------------------------------------------------------------------------


def requeue(
    config: Config,
    vehicles: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    status: str = "failed",
    dry_run: bool = False,
    clock: Clock = system_clock,
    pause: float = CHUNK_PAUSE_SECONDS,
) -> RequeueResult:
    """Put failed (or sent) rows back in the queue: pending, or held for vehicles without a VIN."""
    if status not in REQUEUE_STATUSES:
        raise FilterError(f"status: must be one of {', '.join(REQUEUE_STATUSES)}")
    where, params = _requeue_filter(status, vehicles, since, until)
    with open_outbox(config.outbox.path) as conn:
        if dry_run:
            return _count_requeue(conn, where, params, config.vehicles)
        return _requeue_rows(conn, where, params, config.vehicles, clock, pause)


def _requeue_filter(
    status: str, vehicles: Sequence[str], since: str | None, until: str | None
) -> tuple[str, list[Any]]:
    clauses = [f"status = '{status}'"]  # a literal: a bound parameter hides the partial index
    params: list[Any] = []
    wanted = sorted(set(vehicles))
    if wanted:
        clauses.append(f"vehicle_id IN ({','.join('?' * len(wanted))})")
        params.extend(wanted)
    lo, hi = time_window(since, until)
    if lo is not None:
        clauses.append("event_ts >= ?")
        params.append(lo)
    if hi is not None:
        clauses.append("event_ts < ?")
        params.append(hi)
    return " AND ".join(clauses), params


def _count_requeue(
    conn: sqlite3.Connection, where: str, params: list[Any], mapped: Any
) -> RequeueResult:
    # Failed rows have their own (vehicle_id, event_ts) index; sent rows are reached
    # through their range of positions_done, the least there is without a per-vehicle
    # index (one would cost every row marked sent another index entry).
    index = "positions_failed" if where.startswith("status = 'failed'") else "positions_done"
    pending = held = 0
    held_vehicles = []
    for vehicle_id, n in conn.execute(
        f"SELECT vehicle_id, count(*) FROM positions INDEXED BY {index} WHERE {where}"
        " GROUP BY vehicle_id",
        params,
    ):
        if vehicle_id in mapped:
            pending += n
        else:
            held += n
            held_vehicles.append(vehicle_id)
    return RequeueResult(pending, held, tuple(held_vehicles))


def _requeue_rows(
    conn: sqlite3.Connection,
    where: str,
    params: list[Any],
    mapped: Any,
    clock: Clock,
    pause: float,
) -> RequeueResult:
    # Keyset walk along positions_done: rows leave the walked status as they
    # are requeued, and filtered-out rows are passed over once, not once per chunk.
    counts = {"pending": 0, "held": 0}
    held_vehicles: set[str] = set()
    cursor: list[Any] = ["", 0]

    def step() -> int:
        now = format_ms(int(clock() * 1000))
        rows = conn.execute(
            "SELECT id, vehicle_id, updated_at FROM positions"
            f" INDEXED BY positions_done WHERE {where}"
            " AND (updated_at, id) > (?, ?) ORDER BY updated_at, id LIMIT ?",
            [*params, *cursor, CHUNK],
        ).fetchall()
        updates = []
        for row_id, vehicle_id, _ in rows:
            target = "pending" if vehicle_id in mapped else "held"
            counts[target] += 1
            if target == "held":
                held_vehicles.add(vehicle_id)
            updates.append((target, now, now, row_id))
        # Not before the position's own time: Cartrack refuses events from the future.
        conn.executemany(
            "UPDATE positions SET status = ?, attempts = 0,"
            " next_attempt_at = max(event_ts, ?), updated_at = ? WHERE id = ?",
            updates,
        )
        if rows:
            cursor[:] = [rows[-1][2], rows[-1][0]]
        return len(rows)

    _in_chunks(conn, step, pause)
    return RequeueResult(counts["pending"], counts["held"], tuple(sorted(held_vehicles)))


def _in_chunks(conn: sqlite3.Connection, step: Callable[[], int], pause: float) -> None:
    """Run ``step`` in short write transactions until it handles less than a chunk."""
    for chunk_no in range(1_000_000):  # bound: 10^10 rows
        if chunk_no and pause:
            time.sleep(pause)
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = step()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if done < CHUNK:
            return


# -- purge -----------------------------------------------------------------------------


def purge(
    config: Config,
    days: float,
    quarantine: bool = False,
    dry_run: bool = False,
    clock: Clock = system_clock,
    pause: float = CHUNK_PAUSE_SECONDS,
) -> dict[str, int]:
    """Delete sent rows (and quarantine rows) older than ``days``; 0 means all of them.

    Pending, held and failed rows are never touched.
    """
    if not days >= 0 or days == float("inf"):
        raise FilterError("days: must be a finite number >= 0")
    now_ms = int(clock() * 1000)
    # Clamped at the epoch: an absurd age deletes nothing instead of overflowing.
    cutoff = format_ms(now_ms + 1 if days == 0 else max(0, now_ms - int(days * 86_400_000)))
    targets = [("sent", "positions", "status = 'sent' AND updated_at < ?")]
    if quarantine:
        targets.append(("quarantine", "quarantine", "received_at < ?"))
    result = {"sent": 0, "quarantine": 0}
    with open_outbox(config.outbox.path) as conn:
        for key, table, where in targets:
            if dry_run:
                sql = f"SELECT count(*) FROM {table} WHERE {where}"
                result[key] = conn.execute(sql, (cutoff,)).fetchone()[0]
                continue

            def step(table: str = table, where: str = where, key: str = key) -> int:
                deleted: int = conn.execute(
                    f"DELETE FROM {table} WHERE id IN"
                    f" (SELECT id FROM {table} WHERE {where} LIMIT ?)",
                    (cutoff, CHUNK),
                ).rowcount
                result[key] += deleted
                return deleted

            _in_chunks(conn, step, pause)
    return result
