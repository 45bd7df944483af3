"""``status``: what an operator asks first, as plain JSON-able data.

Every query is served by a partial index: ``positions_pending``/``_held``/``_failed``
and ``positions_done`` (sent and failed rows by updated_at) for the per-status counts
and the newest failures, so millions of delivered rows cost one covering-index pass
(their count) and nothing else; pending rows are read once, for the backlog per vehicle. The keys of the report are a stable interface (``status --json``); README.md
lists them.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from relay.admin.common import age_seconds, file_size, open_outbox, snapshot, snippet
from relay.config import Config
from relay.outbox.schema import status_counts
from relay.timeutil import Clock, format_ms, system_clock

STATUSES = ("pending", "held", "sent", "failed")
TOP = 10

# Per vehicle with pending rows: how many, and the first row of its lane (the one the
# forwarder is working on, so its attempts and last error are the vehicle's state).
# The aggregate is one pass over the partial index (SQLite 3.40 still reads each row
# to test status: measured 0.2-0.6 s for a million pending rows over 5,000 vehicles);
# the join is one index seek per vehicle. INDEXED BY: the planner's choice without
# statistics is not something to rely on.
LANE_HEADS = """
SELECT p.vehicle_id, b.n, p.id, p.event_ts, p.received_at, p.attempts, p.next_attempt_at,
       p.updated_at, p.last_status, p.last_error
FROM (SELECT vehicle_id, count(*) AS n, min(event_ts) AS first_ts
      FROM positions INDEXED BY positions_pending WHERE status = 'pending'
      GROUP BY vehicle_id) AS b
JOIN positions AS p INDEXED BY positions_pending
  ON p.status = 'pending' AND p.vehicle_id = b.vehicle_id AND p.event_ts = b.first_ts
ORDER BY p.vehicle_id, p.id
"""

# The newest dead letters: a backwards walk of the status range, stopped after `top`.
RECENT_FAILED = """
SELECT id, vehicle_id, event_ts, status, attempts, updated_at, last_status, last_error
FROM positions INDEXED BY positions_done WHERE status = 'failed'
ORDER BY updated_at DESC, id DESC LIMIT ?
"""


def status(config: Config, clock: Clock = system_clock, top: int = TOP) -> dict[str, Any]:
    """The status report of the configured outbox."""
    path = config.outbox.path
    with open_outbox(path) as conn, snapshot(conn):
        report = collect_status(conn, int(clock() * 1000), top)
    report["path"] = str(path)
    report["size_bytes"] = file_size(path)
    report["wal_bytes"] = file_size(path.with_name(path.name + "-wal"))
    return report


def collect_status(conn: sqlite3.Connection, now_ms: int, top: int = TOP) -> dict[str, Any]:
    counts = status_counts(conn)
    counts = {status: counts[status] for status in STATUSES}  # the report's key order
    lanes = _lane_heads(conn)
    backlog = sorted(lanes, key=lambda lane: (-lane["n"], lane["vehicle_id"]))[:top]
    held = _held_vehicles(conn)
    state = {
        key: {"value": value, "updated_at": updated_at}
        for key, value, updated_at in conn.execute(
            "SELECT key, value, updated_at FROM relay_state ORDER BY key"
        )
    }
    last_error = state.get("last_error")
    return {
        "generated_at": format_ms(now_ms),
        "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
        "counts": counts,
        "quarantine": conn.execute("SELECT count(*) FROM quarantine").fetchone()[0],
        "oldest_pending": _oldest_pending(lanes, now_ms),
        "backlog_vehicles": [_backlog_entry(lane, now_ms) for lane in backlog],
        "pending_vehicle_count": len(lanes),
        "held_vehicles": held[:top],
        "held_vehicle_count": len(held),
        "failed_by_status": [
            {"last_status": code, "count": n}
            for code, n in conn.execute(
                "SELECT last_status, count(*) AS n FROM positions INDEXED BY positions_failed"
                " WHERE status = 'failed'"
                " GROUP BY last_status ORDER BY n DESC, last_status"
            )
        ],
        "recent_errors": _recent_errors(conn, lanes, top),
        "last_error": (
            None
            if last_error is None
            else {"message": last_error["value"], "updated_at": last_error["updated_at"]}
        ),
        "relay_state": state,
    }


def _lane_heads(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    lanes: dict[str, dict[str, Any]] = {}
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    for row in cursor.execute(LANE_HEADS):
        # Two rows at the same instant: the first stored leads, as in Outbox.next_rows.
        lanes.setdefault(row["vehicle_id"], dict(row))
    return list(lanes.values())


def _backlog_entry(lane: dict[str, Any], now_ms: int) -> dict[str, Any]:
    return {
        "vehicle_id": lane["vehicle_id"],
        "count": lane["n"],
        "oldest_event_ts": lane["event_ts"],
        "oldest_age_seconds": age_seconds(now_ms, lane["event_ts"]),
        "attempts": lane["attempts"],
        "next_attempt_at": lane["next_attempt_at"],
        "last_status": lane["last_status"],
        "last_error": snippet(lane["last_error"]),
    }


def _oldest_pending(lanes: list[dict[str, Any]], now_ms: int) -> dict[str, Any] | None:
    if not lanes:
        return None
    head = min(lanes, key=lambda lane: (lane["event_ts"], lane["id"]))
    return {
        "vehicle_id": head["vehicle_id"],
        "event_ts": head["event_ts"],
        "received_at": head["received_at"],
        # How far behind Cartrack's view of the fleet is, and how long the row has waited.
        "age_seconds": age_seconds(now_ms, head["event_ts"]),
        "waiting_seconds": age_seconds(now_ms, head["received_at"]),
        "attempts": head["attempts"],
        "next_attempt_at": head["next_attempt_at"],
        "last_status": head["last_status"],
        "last_error": head["last_error"],
    }


def _held_vehicles(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT vehicle_id, count(*) FROM positions INDEXED BY positions_held"
        " WHERE status = 'held' GROUP BY vehicle_id"
    ).fetchall()
    rows.sort(key=lambda r: (-r[1], r[0]))
    return [{"vehicle_id": vid, "count": n} for vid, n in rows]


def _recent_errors(
    conn: sqlite3.Connection, lanes: list[dict[str, Any]], top: int
) -> list[dict[str, Any]]:
    """The newest Cartrack failures: dead letters, and lanes retrying their first row."""
    found = [
        {
            "_id": row_id,
            "vehicle_id": vehicle_id,
            "event_ts": event_ts,
            "status": state,
            "attempts": attempts,
            "next_attempt_at": None,
            "updated_at": updated_at,
            "last_status": last_status,
            "last_error": snippet(last_error),
        }
        for row_id, vehicle_id, event_ts, state, attempts, updated_at, last_status, last_error in (
            conn.execute(RECENT_FAILED, (top,))
        )
    ]
    # A retrying lane keeps its first row pending with attempts counted; the forwarder
    # sends each vehicle's rows in order, so that row is where a lane's error sits.
    found += [
        {
            "_id": lane["id"],
            "vehicle_id": lane["vehicle_id"],
            "event_ts": lane["event_ts"],
            "status": "pending",
            "attempts": lane["attempts"],
            "next_attempt_at": lane["next_attempt_at"],
            "updated_at": lane["updated_at"],
            "last_status": lane["last_status"],
            "last_error": snippet(lane["last_error"]),
        }
        for lane in lanes
        if lane["attempts"]
    ]
    # Marked at the same instant: the row stored last first, as the SQL orders them.
    found.sort(key=lambda e: (e["updated_at"], e["_id"]), reverse=True)
    return [{k: v for k, v in e.items() if k != "_id"} for e in found[:top]]
