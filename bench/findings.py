"""Re-measure the design findings the outbox relies on, each as A against B in one run.

1. ``CHECK (status IN (...))`` against the same check written with ``OR``.
2. Unique keys inserted in time order against random order, 100 rows per transaction.
3. A writer thread running one statement per row (the shape aiosqlite invites) against
   statements on the event loop with only BEGIN/COMMIT in a thread, while the loop
   is busy with other work (as it is when webhooks keep coming).
4. Each vehicle's oldest pending row: ``GROUP BY`` against a loose index scan.
5. What the relay does instead of 3: every statement in the writer's thread, while the
   loop never idles (it polls epoll with a zero timeout between bursts, as an event
   loop with requests waiting does). ``executemany`` steps SQLite, and hands the GIL
   over, once per row; one multi-row INSERT does it once per request. Both with the
   switch interval ``serve`` sets (relay/serve.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import select
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import QUICK, loadavg, print_header, print_table, progress, workdir
from relay.outbox.storage import PENDING_VEHICLES
from relay.serve import SWITCH_INTERVAL

STATUS_CHECKS = {
    "IN (...)": "CHECK (status IN ('pending', 'held', 'sent', 'failed'))",
    "OR": "CHECK (status = 'pending' OR status = 'held' OR status = 'sent' OR status = 'failed')",
}


def _table(db: Path, check: str = "", unique: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # the difference measured is CPU, not fsync
    conn.execute(
        f"CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL {'UNIQUE' if unique else ''},"
        f" status TEXT NOT NULL {check}, payload TEXT NOT NULL)"
    )
    return conn


def _insert_rate(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> float:
    """Rows per second into ``conn``'s table, 100 per transaction; closes ``conn``."""
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), 100):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO t (k, status, payload) VALUES (?, ?, ?)", rows[start : start + 100]
            )
            conn.execute("COMMIT")
        return len(rows) / (time.perf_counter() - started)
    finally:
        conn.close()


def gain(slow: float, fast: float) -> float:
    return fast / slow if slow else float("inf")


def best_of(repeats: int, measure: Callable[[int], float]) -> float:
    return max(measure(i) for i in range(repeats))


def check_forms(directory: Path, n: int, repeats: int) -> tuple[float, float]:
    rows = [(f"k{i}", "pending", "x" * 300) for i in range(n)]
    rates = {}
    for name, check in STATUS_CHECKS.items():
        rates[name] = best_of(
            repeats,
            lambda i, c=check, nm=name: _insert_rate(
                _table(directory / f"check-{nm[:2]}-{i}.db", c), rows
            ),
        )
    return rates["IN (...)"], rates["OR"]


def key_order(directory: Path, n: int, repeats: int) -> tuple[float, float]:
    ordered = [(f"frotcom:{i:012d}", "pending", "x" * 300) for i in range(n)]
    shuffled = [
        (str(uuid.UUID(int=random.Random(i).getrandbits(128))), "pending", "x" * 300)
        for i in range(n)
    ]
    return (
        best_of(
            repeats,
            lambda i: _insert_rate(_table(directory / f"rand-{i}.db", unique=True), shuffled),
        ),
        best_of(
            repeats, lambda i: _insert_rate(_table(directory / f"ord-{i}.db", unique=True), ordered)
        ),
    )


async def _busy_loop(stop: asyncio.Event, idle: float) -> None:
    # Webhook-like load: bursts of 2 ms of Python work, then ``idle`` seconds in epoll.
    # Never idle at all (a spin), any thread starves for the GIL, for minutes: not
    # measured here, as it never ends in a bounded time.
    while not stop.is_set():
        until = time.perf_counter() + 0.002
        while time.perf_counter() < until:
            sum(i * i for i in range(200))
        await asyncio.sleep(idle)


def _per_row_txn(
    conn: sqlite3.Connection, rows: list[tuple[str, str, str]], deadline: float
) -> int:
    """One statement per row; stops at the deadline (a stalled thread can take minutes)."""
    done = 0
    conn.execute("BEGIN")
    for row in rows:
        if time.perf_counter() > deadline:
            break
        conn.execute("INSERT INTO t (k, status, payload) VALUES (?, ?, ?)", row)
        done += 1
    conn.execute("COMMIT")
    return done


async def _writer_shapes(
    directory: Path, requests: int, bound: float, idle: float
) -> tuple[float, float]:
    batch = [(f"k{i}", "pending", "x" * 300) for i in range(100)]
    results = []
    for shape in ("thread, one statement per row", "loop, one multi-row INSERT"):
        conn = _table(directory / f"gil-{idle}-{len(results)}.db", unique=True)
        stop = asyncio.Event()
        busy = asyncio.create_task(_busy_loop(stop, idle))
        started = time.perf_counter()
        done = 0
        for r in range(requests):
            if time.perf_counter() - started > bound:
                break
            rows = [(f"{r}:{k}", s, p) for k, s, p in batch]
            if shape.startswith("thread"):
                done += await asyncio.to_thread(_per_row_txn, conn, rows, started + bound)
                continue
            else:
                await asyncio.to_thread(conn.execute, "BEGIN")
                marks = ",".join(["(?, ?, ?)"] * len(rows))
                conn.execute(
                    f"INSERT INTO t (k, status, payload) VALUES {marks}",
                    [v for row in rows for v in row],
                )
                await asyncio.to_thread(conn.execute, "COMMIT")
            done += len(rows)
        results.append(done / (time.perf_counter() - started))
        stop.set()
        await busy
        conn.close()
    return results[0], results[1]


def _saturated_loop(stop: threading.Event, deadline: float) -> None:
    poller = select.epoll()
    try:
        while not stop.is_set() and time.perf_counter() < deadline:
            sum(i * i for i in range(3000))  # ~200 us of Python, then a zero-timeout poll
            poller.poll(0)
    finally:
        poller.close()


def thread_writer(directory: Path, requests: int, bound: float, multi_row: bool) -> float:
    """Rows/s of a writer thread (8 requests of 100 rows per transaction) beside a
    saturated loop on the main thread, with the switch interval ``serve`` sets.

    Rows count once their statement returned, up to ``bound`` seconds; then the loop
    stops spinning so the thread can finish (a starved thread could take minutes).
    """
    conn = _table(directory / f"thread-{multi_row}.db", unique=True)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    stop = threading.Event()
    done = 0

    def writer() -> None:
        nonlocal done
        try:
            for first in range(0, requests, 8):
                conn.execute("BEGIN")
                for r in range(first, min(first + 8, requests)):
                    rows = [(f"{r}:{k}", "pending", "x" * 300) for k in range(100)]
                    if multi_row:
                        marks = ",".join(["(?, ?, ?)"] * len(rows))
                        conn.execute(
                            f"INSERT INTO t (k, status, payload) VALUES {marks}",
                            [v for row in rows for v in row],
                        )
                    else:
                        conn.executemany(
                            "INSERT INTO t (k, status, payload) VALUES (?, ?, ?)", rows
                        )
                    done += len(rows)
                conn.execute("COMMIT")
                if stop.is_set():
                    break
        finally:
            stop.set()

    started = time.perf_counter()
    thread = threading.Thread(target=writer, name="bench-writer")
    thread.start()
    try:
        _saturated_loop(stop, started + bound)
        counted, elapsed = done, time.perf_counter() - started
        stop.set()
    finally:
        thread.join()
        sys.setswitchinterval(previous)
        conn.close()
    return counted / elapsed


def oldest_per_vehicle(
    directory: Path, rows: int, vehicles: int, repeats: int
) -> tuple[float, float]:
    conn = sqlite3.connect(directory / "scan.db", isolation_level=None)
    conn.execute(
        "CREATE TABLE positions (id INTEGER PRIMARY KEY, vehicle_id TEXT NOT NULL,"
        " event_ts TEXT NOT NULL, status TEXT NOT NULL, payload TEXT NOT NULL)"
    )
    conn.execute(
        "CREATE INDEX positions_pending ON positions (vehicle_id, event_ts) WHERE status = 'pending'"
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO positions (vehicle_id, event_ts, status, payload) VALUES (?, ?, 'pending', 'x')",
        [
            (
                f"v{i % vehicles:05d}",
                f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.{i:03d}",
            )
            for i in range(rows)
        ],
    )
    conn.execute("COMMIT")
    group_by = (
        "SELECT vehicle_id, min(event_ts) FROM positions INDEXED BY positions_pending"
        " WHERE status = 'pending' GROUP BY vehicle_id"
    )
    # The relay's own statement (Outbox.pending_vehicles), each vehicle's oldest row added.
    loose = f"""
        SELECT vehicle_id, (SELECT min(event_ts) FROM positions INDEXED BY positions_pending
                            WHERE status = 'pending' AND vehicle_id = v.vehicle_id)
        FROM ({PENDING_VEHICLES}) AS v
    """
    assert conn.execute(group_by).fetchall() == conn.execute(loose).fetchall()
    timings = []
    for sql in (group_by, loose):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            conn.execute(sql).fetchall()
            best = min(best, time.perf_counter() - started)
        timings.append(best * 1000)
    conn.close()
    return timings[0], timings[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=2_000 if QUICK else 50_000)
    p.add_argument("--requests", type=int, default=5 if QUICK else 200)
    p.add_argument("--backlog", type=int, default=2_000 if QUICK else 20_000)
    p.add_argument("--repeats", type=int, default=1 if QUICK else 3)
    p.add_argument("--seconds", type=float, default=2 if QUICK else 10, help="bound per shape")
    args = p.parse_args(argv)
    print_header("findings: the measurements the outbox design rests on")
    table = []
    with workdir("findings") as directory:
        progress("CHECK IN (...) against OR")
        slow, fast = check_forms(directory, args.rows, args.repeats)
        table.append(["CHECK status IN (...) vs OR", "rows/s", slow, fast, gain(slow, fast)])
        progress("random against time-ordered unique keys")
        slow, fast = key_order(directory, args.rows, args.repeats)
        table.append(
            ["unique keys: random vs time-ordered", "rows/s", slow, fast, gain(slow, fast)]
        )
        for idle, busy in ((0.0005, "80% busy"), (0.0001, "95% busy")):
            progress(f"writer thread per row against statements on the loop, loop {busy}")
            slow, fast = asyncio.run(_writer_shapes(directory, args.requests, args.seconds, idle))
            table.append(
                [
                    f"loop {busy}: thread per-row vs loop multi-row",
                    "rows/s",
                    slow,
                    fast,
                    gain(slow, fast),
                ]
            )
        progress("writer thread beside a saturated loop: executemany against multi-row")
        slow = thread_writer(directory, args.requests, args.seconds, False)
        fast = thread_writer(directory, args.requests, args.seconds, True)
        table.append(
            [
                "loop saturated: thread executemany vs multi-row",
                "rows/s",
                slow,
                fast,
                gain(slow, fast),
            ]
        )
        progress("GROUP BY against a loose index scan")
        slow_ms, fast_ms = oldest_per_vehicle(
            directory, args.backlog, max(1, args.backlog // 100), args.repeats * 5
        )
        table.append(
            [
                f"oldest row per vehicle, {args.backlog:,} pending",
                "ms",
                slow_ms,
                fast_ms,
                gain(fast_ms, slow_ms),
            ]
        )
    print_table(["finding", "unit", "A (slower form)", "B (form used)", "B's gain (x)"], table)
    print(f"load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
