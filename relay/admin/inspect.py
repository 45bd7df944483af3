"""``inspect``: where is my position? Every row of one vehicle, or one event by its id.

Positions of one vehicle are found through the unique index on ``provider_event_id``,
which is ``{provider}:{VehicleID}:{event_ts}`` (SPEC section 2) with ``event_ts`` in
fixed-width ISO-8601, so one vehicle's rows of one provider are one contiguous,
time-ordered range of that index, whatever their status. The providers present are
found by skipping along the same index (one seek per provider, normally one), plus
the configured one. ``vehicle_id`` and ``event_ts`` are still compared, so the
ranges only make it fast, never wrong about another vehicle's rows.

``quarantine`` rows for a vehicle come from its ``quarantine_vehicle`` index (schema 2).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from relay.admin.common import open_outbox, snapshot, snippet, time_window
from relay.admin.report import STATUSES
from relay.config import Config
from relay.timeutil import Clock, format_ms, system_clock

LIMIT = 50
MAX_PROVIDERS = 1000  # bound on the skip scan; a relay has one provider name, or a few
# ":" + 1 in ASCII: the end of every id that starts with "{prefix}:".
_AFTER_COLON = ";"

COLUMNS = (
    "id, provider_event_id, vehicle_id, event_ts, event_type, status, attempts,"
    " next_attempt_at, received_at, updated_at, sent_at, last_status, last_error"
)


def inspect_vehicle(
    config: Config,
    vehicle_id: str,
    since: str | None = None,
    until: str | None = None,
    limit: int = LIMIT,
    clock: Clock = system_clock,
) -> dict[str, Any]:
    """A vehicle's positions in ``[since, until)``, in time order, and its quarantine.

    At most ``limit``: the first ones from ``since`` when it is given (reading on from
    a point in time), else the newest ones.
    """
    lo, hi = time_window(since, until)
    with open_outbox(config.outbox.path) as conn, snapshot(conn):
        prefixes = sorted({*providers(conn), config.cartrack.provider})
        where, params = _vehicle_filter(prefixes, vehicle_id, lo, hi)
        counts = dict.fromkeys(STATUSES, 0)
        for state, n in conn.execute(
            f"SELECT status, count(*) FROM positions WHERE {where} GROUP BY status", params
        ):
            counts[state] += n
        order = "ASC" if lo is not None else "DESC"
        found = _rows(
            conn,
            f"SELECT {COLUMNS} FROM positions WHERE {where}"
            f" ORDER BY event_ts {order}, id {order} LIMIT ?",
            [*params, limit],
        )
        quarantined = _quarantine(conn, vehicle_id, limit)
    positions = found if lo is not None else found[::-1]
    return {
        "generated_at": format_ms(int(clock() * 1000)),
        "vehicle_id": vehicle_id,
        "event_id": None,
        "since": lo,
        "until": hi,
        "limit": limit,
        "counts": counts,
        "total": sum(counts.values()),
        "positions": [_public(r) for r in positions],
        "quarantine": quarantined,
    }


def inspect_event(config: Config, event_id: str, clock: Clock = system_clock) -> dict[str, Any]:
    """The position with this ``provider_event_id`` (the id Cartrack was sent)."""
    with open_outbox(config.outbox.path) as conn:
        found = _rows(
            conn, f"SELECT {COLUMNS} FROM positions WHERE provider_event_id = ?", [event_id]
        )
    counts = dict.fromkeys(STATUSES, 0)
    for row in found:
        counts[row["status"]] += 1
    return {
        "generated_at": format_ms(int(clock() * 1000)),
        "vehicle_id": found[0]["vehicle_id"] if found else None,
        "event_id": event_id,
        "since": None,
        "until": None,
        "limit": 1,
        "counts": counts,
        "total": len(found),
        "positions": [_public(r) for r in found],
        "quarantine": None,
    }


def providers(conn: sqlite3.Connection) -> list[str]:
    """The distinct ``{provider}`` prefixes of provider_event_id, by skipping along its index."""
    found: list[str] = []
    bound = ""
    for _ in range(MAX_PROVIDERS):
        (first,) = conn.execute(
            "SELECT min(provider_event_id) FROM positions WHERE provider_event_id >= ?", (bound,)
        ).fetchone()
        if first is None:
            break
        prefix, colon, _ = first.partition(":")
        if not colon:  # not an id the relay writes; step over it alone
            bound = first + "\x00"
            continue
        found.append(prefix)
        bound = prefix + _AFTER_COLON
    return found


def _vehicle_filter(
    prefixes: list[str], vehicle_id: str, lo: str | None, hi: str | None
) -> tuple[str, list[Any]]:
    # One id range per provider; OR-ed, SQLite reads each range through the index and
    # drops a row found twice (a provider name may contain ":" and so overlap another).
    ranges: list[str] = []
    params: list[Any] = []
    for prefix in prefixes:
        head = f"{prefix}:{vehicle_id}:"
        ranges.append("(provider_event_id >= ? AND provider_event_id < ?)")
        params += [head + (lo or ""), head + hi if hi is not None else head[:-1] + _AFTER_COLON]
    clauses = [f"({' OR '.join(ranges)})", "vehicle_id = ?"]
    params.append(vehicle_id)
    if lo is not None:
        clauses.append("event_ts >= ?")
        params.append(lo)
    if hi is not None:
        clauses.append("event_ts < ?")
        params.append(hi)
    return " AND ".join(clauses), params


def _rows(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    return [dict(r) for r in cursor.execute(sql, params)]


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_ts": row["event_ts"],
        "status": row["status"],
        "event_type": row["event_type"],
        "attempts": row["attempts"],
        # Only meaningful while the row waits; a sent or failed row is not scheduled.
        "next_attempt_at": row["next_attempt_at"] if row["status"] == "pending" else None,
        "received_at": row["received_at"],
        "updated_at": row["updated_at"],
        "sent_at": row["sent_at"],
        "last_status": row["last_status"],
        "last_error": snippet(row["last_error"]),
        "provider_event_id": row["provider_event_id"],
    }


def _quarantine(conn: sqlite3.Connection, vehicle_id: str, limit: int) -> dict[str, Any]:
    total = conn.execute(
        "SELECT count(*) FROM quarantine WHERE vehicle_id = ?", (vehicle_id,)
    ).fetchone()[0]
    newest = conn.execute(
        "SELECT received_at, reason, raw FROM quarantine WHERE vehicle_id = ?"
        " ORDER BY id DESC LIMIT ?",
        (vehicle_id, limit),
    ).fetchall()
    return {
        "total": total,
        "rows": [
            {"received_at": received, "reason": reason, "raw": snippet(raw)}
            for received, reason, raw in reversed(newest)
        ],
    }
