"""Bench 1, ingest: concurrent Frotcom senders against the relay, and SQLite's own limit.

The relay runs as ``serve`` in its own process, the senders in another. Its vehicles
are unmapped, so every row is stored ``held`` and the forwarder stays idle: this
measures the webhook path alone. The ceiling is plain ``sqlite3`` inserting the same
rows (same schema, same indexes, same payloads) in batches of 100 with WAL and
``synchronous=FULL`` on the same disk. Ceiling and relay runs alternate for a few
rounds and the table gives medians, with every run printed below it, so drift on a
shared machine shows up instead of deciding the ratio. Between the two, the relay's
storage path without HTTP (bench.storage), alone and beside an event loop, so the
table also says where the gap to the ceiling goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    INSERT_SQL,
    QUICK,
    Relay,
    add_comparison_options,
    cpu_seconds,
    loadavg,
    loadgen_args,
    outbox_rows,
    per_vehicle,
    positions_body,
    print_header,
    print_table,
    progress,
    run_json,
    workdir,
)
from bench.storage import alone, beside_loop
from relay.outbox.schema import connect

FLEET = 1000
# Jobs per group for the storage path alone: what 8 senders give (two cohorts of 4).
GROUP = 4


def ceiling(directory: Path, rows: list[tuple[Any, ...]], per_txn: int) -> float:
    """Rows per second for plain sqlite3: executemany + COMMIT per ``per_txn`` rows."""
    db = directory / f"ceiling-{per_txn}-{time.monotonic_ns()}.sqlite3"
    os.sync()  # as Relay.__enter__: the run before it settled on disk (bench.common.remove)
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
    directory: Path,
    senders: int,
    batches: int,
    base_ms: int,
    event_loop: str,
    round_no: int = 1,
    vary: bool = False,
) -> dict[str, Any]:
    run_dir = directory / f"relay-{senders}-{event_loop}-{round_no}"
    run_dir.mkdir()
    db = run_dir / "outbox.sqlite3"
    # No Cartrack traffic: the URL is never used because no vehicle is mapped.
    relay = Relay(run_dir, db, "http://127.0.0.1:9/", vehicles={}, event_loop=event_loop)
    with relay:
        cpu0 = cpu_seconds(relay.pid)
        result = run_json(
            loadgen_args(relay.url, senders, batches, base_ms, 90, fleet_size=FLEET, vary=vary),
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
    p.add_argument(
        "--vary",
        action="store_true",
        help="batches of 10-190 positions (mean 100) instead of all 100; the ceiling"
        " inserts the same rows, still 100 per transaction",
    )
    add_comparison_options(p, rounds=3)
    args = p.parse_args(argv)
    print_header(
        f"ingest: {args.batches} requests of {'10-190 (mean 100)' if args.vary else '100'}"
        f" positions per run, {args.rounds} round(s)"
    )
    base_ms = int(time.time() * 1000) - 20 * 86_400_000
    received_ms = int(time.time() * 1000)
    rows: list[tuple[Any, ...]] = []
    bodies: list[bytes] = []  # as the load generator sends them
    for b in range(args.batches):
        body = positions_body(b, base_ms, FLEET, per_vehicle=per_vehicle(b, args.vary))
        rows += outbox_rows(body, received_ms, "held")
        bodies.append(json.dumps(body).encode())
    results: dict[str, Any] = {"load_before": loadavg()}
    ceilings: list[float] = []
    storage: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with workdir("ingest") as directory:
        # Round after round, the ceiling beside the relay runs: the machine drifts by
        # tens of percent within minutes, and a median of interleaved runs does not.
        for n in range(1, args.rounds + 1):
            progress(f"round {n}: ceiling, sqlite3 batch 100, synchronous=FULL")
            ceilings.append(ceiling(directory, rows, 100))
            # Between the ceiling and the relay end to end: its storage path without
            # HTTP (bench.storage), so the table says where the gap goes.
            progress(f"round {n}: relay storage path alone, groups of {GROUP}")
            storage.setdefault(f"alone, groups of {GROUP}", []).append(
                alone(directory, bodies, received_ms, GROUP)
            )
            for senders in args.senders:
                progress(f"round {n}: relay storage path beside the loop, {senders} tasks")
                storage.setdefault(f"beside the loop, {senders} tasks", []).append(
                    beside_loop(directory, bodies, received_ms, senders)
                )
            for senders in args.senders:
                for loop in args.event_loops:
                    progress(f"round {n}: relay, {senders} senders, {loop}")
                    runs.setdefault(f"{senders} senders, {loop}", []).append(
                        relay_run(directory, senders, args.batches, base_ms, loop, n, args.vary)
                    )
        progress("ceiling once more, then batch 1000")
        ceilings.append(ceiling(directory, rows, 100))
        big = ceiling(directory, rows, 1000)
    ceiling_100 = statistics.median(ceilings)
    results.update(
        ceiling_100=ceilings, ceiling_1000=big, storage=storage, runs=runs, load_after=loadavg()
    )
    table = [
        ["sqlite3 batch 100, FULL (ceiling)", ceiling_100, "", "", "", 1.0],
        ["sqlite3 batch 1000, FULL", big, "", "", "", big / ceiling_100],
    ]
    for name, rs in storage.items():
        rate = statistics.median(r["rate"] for r in rs)
        table.append(
            [
                f"relay storage path {name}, no HTTP",
                rate,
                _median(rs, "p50_ms"),
                _median(rs, "p99_ms"),
                statistics.median(r["cpu_ms_per_1000"] for r in rs),
                rate / ceiling_100,
            ]
        )
    for name, rs in runs.items():
        rate = statistics.median(r["rate"] for r in rs)
        table.append(
            [
                f"relay, {name}",
                rate,
                statistics.median(r["p50_ms"] for r in rs),
                statistics.median(r["p99_ms"] for r in rs),
                statistics.median(r["cpu_ms_per_1000"] for r in rs),
                rate / ceiling_100,
            ]
        )
    print_table(
        ["ingest", "positions/s", "ack p50 ms", "ack p99 ms", "relay CPU ms/1000", "x ceiling"],
        table,
    )
    every = "; ".join(
        f"{name}: " + ", ".join(f"{r['rate']:,.0f}" for r in rs) for name, rs in runs.items()
    )
    print(
        "medians of the runs; ceiling runs (rows/s): "
        + ", ".join(f"{c:,.0f}" for c in ceilings)
        + "; storage path runs (positions/s): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{r['rate']:,.0f}" for r in rs) for name, rs in storage.items()
        )
        + f"; relay runs (positions/s): {every};"
        f" errors: {sum(r['errors'] for rs in runs.values() for r in rs)};"
        f" load {results['load_before']} -> {results['load_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _median(runs: list[dict[str, Any]], key: str) -> float | str:
    """The median of ``key`` over runs that measured it; blank in the table otherwise."""
    return statistics.median(r[key] for r in runs) if key in runs[0] else ""


if __name__ == "__main__":
    sys.exit(main())
