"""Operator commands behind the CLI: ``status``, ``requeue`` and ``purge``.

They use their own synchronous connection to the outbox file, so they work while the
daemon runs (WAL plus the busy timeout). Every query is served by an index: the
partial ones for pending/held/failed rows, ``positions_status_updated`` for sent rows,
so millions of delivered rows cost nothing except in the per-status count. Writes
happen in short ``BEGIN IMMEDIATE`` chunks with a pause between them, so the daemon
(whose busy handler polls at most every 100 ms) always gets the lock in between.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.outbox.schema import OutboxError, connect
from relay.timeutil import Clock, format_ms, parse_timestamp, system_clock

STATUSES = ("pending", "held", "sent", "failed")
REQUEUE_STATUSES = ("failed", "sent")
TOP = 10
CHUNK = 10_000
# Longer than the longest sleep of SQLite's default busy handler (100 ms), so a
# daemon waiting for the write lock polls at least once between two chunks.
CHUNK_PAUSE_SECONDS = 0.11


class FilterError(ValueError):
    """An argument of an operator command that cannot be used; the message names it."""


class AdminError(Exception):
    """The outbox could not be read or changed right now (locked too long, I/O error)."""


@dataclass(frozen=True)
class RequeueResult:
    pending: int
    held: int
    held_vehicles: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.pending + self.held


@contextlib.contextmanager
def open_outbox(path: Path) -> Iterator[sqlite3.Connection]:
    """The outbox connection, with SQLite failures turned into one-line errors."""
    conn = connect(path)
    try:
        yield conn
    except sqlite3.OperationalError as exc:
        raise AdminError(f"{path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"{path}: not a usable outbox database: {exc}") from None
    finally:
        conn.close()


# -- status ----------------------------------------------------------------------------


def status(config: Config, clock: Clock = system_clock) -> dict[str, Any]:
    """Everything an operator asks first, as plain JSON-able data."""
    path = config.outbox.path
    with open_outbox(path) as conn:
        # One read transaction: every number comes from the same snapshot. Under WAL it
        # does not hold up the daemon's writes.
        conn.execute("BEGIN")
        try:
            report = collect_status(conn, int(clock() * 1000))
        finally:
            conn.execute("COMMIT")
    report["path"] = str(path)
    report["size_bytes"] = _size(path)
    report["wal_bytes"] = _size(path.with_name(path.name + "-wal"))
    return report


def collect_status(conn: sqlite3.Connection, now_ms: int) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    for state, n in conn.execute("SELECT status, count(*) FROM positions GROUP BY status"):
        counts[state] = n
    held = _per_vehicle(conn, "held")
    backlog = _per_vehicle(conn, "pending")
    failed = [
        {"last_status": code, "count": n}
        for code, n in conn.execute(
            "SELECT last_status, count(*) AS n FROM positions INDEXED BY positions_failed"
            " WHERE status = 'failed'"
            " GROUP BY last_status ORDER BY n DESC, last_status"
        )
    ]
    last_error = conn.execute(
        "SELECT value, updated_at FROM relay_state WHERE key = 'last_error'"
    ).fetchone()
    return {
        "generated_at": format_ms(now_ms),
        "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
        "counts": counts,
        "quarantine": conn.execute("SELECT count(*) FROM quarantine").fetchone()[0],
        "oldest_pending": _oldest_pending(conn, now_ms),
        "held_vehicles": held[:TOP],
        "held_vehicle_count": len(held),
        "backlog_vehicles": backlog[:TOP],
        "pending_vehicle_count": len(backlog),
        "failed_by_status": failed,
        "last_error": (
            None if last_error is None else {"message": last_error[0], "updated_at": last_error[1]}
        ),
    }


def _per_vehicle(conn: sqlite3.Connection, state: str) -> list[dict[str, Any]]:
    # `state` is one of our literals: a bound parameter would hide the partial index, and
    # INDEXED BY keeps the planner (which has no statistics) off positions_status_updated.
    assert state in ("pending", "held")
    rows = conn.execute(
        f"SELECT vehicle_id, count(*) FROM positions INDEXED BY positions_{state}"
        f" WHERE status = '{state}' GROUP BY vehicle_id"
    ).fetchall()
    rows.sort(key=lambda r: (-r[1], r[0]))
    return [{"vehicle_id": vid, "count": n} for vid, n in rows]


def _oldest_pending(conn: sqlite3.Connection, now_ms: int) -> dict[str, Any] | None:
    # Two steps: min() over the covering partial index, then one index seek for the row,
    # instead of sorting every pending row with its table columns.
    first = conn.execute(
        "SELECT min(event_ts), vehicle_id FROM positions INDEXED BY positions_pending"
        " WHERE status = 'pending'"
    ).fetchone()
    if first is None or first[0] is None:
        return None
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    row = cursor.execute(
        "SELECT vehicle_id, event_ts, received_at, attempts, next_attempt_at, last_status,"
        " last_error FROM positions WHERE status = 'pending' AND vehicle_id = ? AND event_ts = ?"
        " ORDER BY id LIMIT 1",
        (first[1], first[0]),
    ).fetchone()
    if row is None:  # sent between the two reads (only outside status()'s transaction)
        return None
    oldest = dict(row)
    # How far behind Cartrack's view of the fleet is, and how long the row has waited.
    oldest["age_seconds"] = round((now_ms - parse_timestamp(row["event_ts"])) / 1000, 3)
    oldest["waiting_seconds"] = round((now_ms - parse_timestamp(row["received_at"])) / 1000, 3)
    return oldest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- requeue ---------------------------------------------------------------------------


def parse_time(text: str) -> str:
    """An operator's ISO-8601 time as the outbox spells it; ValueError if it is not one."""
    try:
        return format_ms(parse_timestamp(text))
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not an ISO-8601 time (e.g. 2024-05-01T00:00:00Z)") from None


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
    bounds = {}
    for name, text in (("since", since), ("until", until)):
        if text is not None:
            try:
                bounds[name] = parse_time(text)
            except ValueError as exc:
                raise FilterError(f"{name}: {exc}") from None
    if "since" in bounds and "until" in bounds and bounds["since"] >= bounds["until"]:
        raise FilterError("since: must be before until")
    if "since" in bounds:
        clauses.append("event_ts >= ?")
        params.append(bounds["since"])
    if "until" in bounds:
        clauses.append("event_ts < ?")
        params.append(bounds["until"])
    return " AND ".join(clauses), params


def _count_requeue(
    conn: sqlite3.Connection, where: str, params: list[Any], mapped: Any
) -> RequeueResult:
    # Failed rows have their own (vehicle_id, event_ts) index; sent rows are reached
    # through their status range, the least there is without a per-vehicle index.
    index = (
        "positions_failed" if where.startswith("status = 'failed'") else "positions_status_updated"
    )
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
    # Keyset walk along positions_status_updated: rows leave the walked status as they
    # are requeued, and filtered-out rows are passed over once, not once per chunk.
    counts = {"pending": 0, "held": 0}
    held_vehicles: set[str] = set()
    cursor: list[Any] = ["", 0]

    def step() -> int:
        now = format_ms(int(clock() * 1000))
        rows = conn.execute(
            "SELECT id, vehicle_id, updated_at FROM positions"
            f" INDEXED BY positions_status_updated WHERE {where}"
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


# -- rendering -------------------------------------------------------------------------


def render_status(report: dict[str, Any]) -> str:
    """The status report as aligned text for a terminal."""
    lines: list[str] = []

    def row(label: str, value: Any, indent: int = 0) -> None:
        lines.append(f"{' ' * indent}{label:<{22 - indent}} {value}")

    wal = report.get("wal_bytes", 0)
    row("outbox", report.get("path", "?"))
    wal_text = f" (+ {_human_bytes(wal)} WAL)" if wal else ""
    row("size", _human_bytes(report.get("size_bytes", 0)) + wal_text)
    row("schema version", report["schema_version"])
    row("generated at", report["generated_at"])
    lines.extend(["", "positions"])
    counts = report["counts"]
    width = max(len(f"{n:,}") for n in counts.values())
    for state in STATUSES:
        row(state, f"{counts[state]:>{width},}", indent=2)
    row("quarantine", f"{report['quarantine']:,}")
    lines.append("")

    oldest = report["oldest_pending"]
    if oldest is None:
        row("oldest pending", "none")
    else:
        row("oldest pending", f"{oldest['event_ts']}  vehicle {oldest['vehicle_id']}")
        row("age", _age(oldest["age_seconds"]), indent=2)
        row("received", f"{oldest['received_at']} ({_age(oldest['waiting_seconds'])})", indent=2)
        row("attempts", oldest["attempts"], indent=2)
        if oldest["attempts"]:
            row("next attempt", oldest["next_attempt_at"], indent=2)
        if oldest["last_error"]:
            row("last error", _one_line(oldest["last_error"]), indent=2)

    _vehicle_table(
        lines, "backlog (pending)", report["backlog_vehicles"], report["pending_vehicle_count"]
    )
    _vehicle_table(lines, "held (no VIN)", report["held_vehicles"], report["held_vehicle_count"])
    if report["held_vehicle_count"]:
        lines.append("  add their VINs to [vehicles] and reload (SIGHUP) to send them")

    if report["failed_by_status"]:
        lines.extend(["", "failed by last status"])
        for entry in report["failed_by_status"]:
            code = entry["last_status"]
            row("no answer" if code is None else f"HTTP {code}", f"{entry['count']:,}", indent=2)
        lines.append("  `cartrack-relay requeue` sends them again")

    lines.append("")
    last = report["last_error"]
    if last is None:
        row("last Cartrack error", "none")
    else:
        row("last Cartrack error", last["updated_at"])
        row("", _one_line(last["message"] or ""), indent=2)
    return "\n".join(lines)


def _vehicle_table(lines: list[str], title: str, top: list[dict[str, Any]], total: int) -> None:
    if not total:
        return
    lines.append("")
    shown = f", top {len(top)}" if total > len(top) else ""
    lines.append(f"{title}: {total} vehicle{'s' if total != 1 else ''}{shown}")
    width = max(len(f"{e['count']:,}") for e in top)
    for entry in top:
        lines.append(f"  {entry['vehicle_id']:<20} {entry['count']:>{width},}")


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _age(seconds: float) -> str:
    days, rest = divmod(int(abs(seconds)), 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    # The two largest units are precise enough for an operator.
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), 3)
    text = " ".join(f"{n}{unit}" for n, unit in parts[first : first + 2])
    return f"{text} in the future" if seconds < 0 else f"{text} ago"


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 -- the last unit reached is used below
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"
