"""Bench 1, ingest: concurrent Frotcom senders against the relay, and SQLite's own limit.

The relay runs as ``serve`` in its own process, the senders in another. Its vehicles
are unmapped, so every row is stored ``held`` and the forwarder stays idle: this
measures the webhook path alone. The ceiling is plain ``sqlite3`` inserting the same
rows (same schema, same indexes, same payloads) in batches of 100 with WAL and
``synchronous=FULL`` on the same disk; it runs before and after the relay and the
ratio uses the mean, so drift on a shared machine shows up instead of hiding.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    INSERT_SQL,
    QUICK,
    Relay,
    cpu_seconds,
    loadavg,
    outbox_rows,
    positions_body,
    print_header,
    print_table,
    progress,
    run_json,
    workdir,
)
from relay.outbox.schema import connect

FLEET = 1000


def ceiling(directory: Path, rows: list[tuple[Any, ...]], per_txn: int) -> float:
    """Rows per second for plain sqlite3: executemany + COMMIT per ``per_txn`` rows."""
    db = directory / f"ceiling-{per_txn}-{time.monotonic_ns()}.sqlite3"
    connect(db, create=True).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    started = time.perf_counter()
    for start in range(0, len(rows), per_txn):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_SQL, rows[start : start + per_txn])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    stored = conn.execute("SELECT count(*) FROM positions").fetchone()[0]
    conn.close()
    assert stored == len(rows), (stored, len(rows))
    return len(rows) / elapsed


def relay_run(
    directory: Path, senders: int, batches: int, base_ms: int, event_loop: str
) -> dict[str, Any]:
    run_dir = directory / f"relay-{senders}-{event_loop}"
    run_dir.mkdir()
    db = run_dir / "outbox.sqlite3"
    # No Cartrack traffic: the URL is never used because no vehicle is mapped.
    relay = Relay(run_dir, db, "http://127.0.0.1:9/", vehicles={}, event_loop=event_loop)
    with relay:
        cpu0 = cpu_seconds(relay.pid)
        result = run_json(
            [
                "-m",
                "bench.loadgen",
                "--url",
                relay.url,
                "--senders",
                str(senders),
                "--batches",
                str(batches),
                "--fleet",
                str(FLEET),
                "--base-ms",
                str(base_ms),
                "--duration",
                "90",
            ],
            timeout=300,
        )
        result["cpu_s"] = cpu_seconds(relay.pid) - cpu0
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT count(*) FROM positions").fetchone()[0]
    conn.close()
    result["stored"] = stored
    result["rate"] = stored / result["elapsed"]
    result["cpu_ms_per_1000"] = result["cpu_s"] * 1e6 / max(1, stored)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=20 if QUICK else 1500)
    p.add_argument("--senders", type=int, nargs="+", default=[8, 32])
    p.add_argument("--event-loops", nargs="+", default=["asyncio", "uvloop"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    print_header(f"ingest: {args.batches} requests of 100 positions per run")
    base_ms = int(time.time() * 1000) - 20 * 86_400_000
    received_ms = int(time.time() * 1000)
    rows: list[tuple[Any, ...]] = []
    for b in range(args.batches):
        rows += outbox_rows(positions_body(b, base_ms, FLEET), received_ms, "held")
    results: dict[str, Any] = {"load_before": loadavg()}
    with workdir("ingest") as directory:
        progress("ceiling: sqlite3 batch 100, synchronous=FULL")
        first = ceiling(directory, rows, 100)
        runs = {}
        for senders in args.senders:
            for loop in args.event_loops:
                progress(f"relay: {senders} senders, {loop}")
                runs[f"{senders} senders, {loop}"] = relay_run(
                    directory, senders, args.batches, base_ms, loop
                )
        progress("ceiling again, then batch 1000")
        second = ceiling(directory, rows, 100)
        big = ceiling(directory, rows, 1000)
    ceiling_100 = (first + second) / 2
    results.update(
        ceiling_100=[first, second],
        ceiling_1000=big,
        runs=runs,
        load_after=loadavg(),
    )
    table = [
        ["sqlite3 batch 100, FULL (ceiling)", ceiling_100, "", "", "", 1.0],
        ["sqlite3 batch 1000, FULL", big, "", "", "", big / ceiling_100],
    ]
    for name, r in runs.items():
        table.append(
            [
                f"relay, {name}",
                r["rate"],
                r["p50_ms"],
                r["p99_ms"],
                r["cpu_ms_per_1000"],
                r["rate"] / ceiling_100,
            ]
        )
    print_table(
        ["ingest", "positions/s", "ack p50 ms", "ack p99 ms", "relay CPU ms/1000", "x ceiling"],
        table,
    )
    print(
        f"ceiling runs: {first:,.0f} and {second:,.0f} rows/s;"
        f" errors: {sum(r['errors'] for r in runs.values())};"
        f" load {results['load_before']} -> {results['load_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
