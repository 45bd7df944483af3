"""Bench 3, scale of the backlog: what 10k, 100k and 1M rows in the outbox cost.

Each outbox holds the given number of rows, 90% sent and the newest 10% pending (at
1M: 900k sent, 100k pending). For each size: ``cartrack-relay status`` (a real
subprocess, interpreter start included), the relay's start to ready, the drain rate
near the start and near the end of the backlog (requests 5-25% against 75-95%, as the
stand-in saw them, so warm-up and the last lanes finishing do not count), and the
relay's peak RSS. The windows were 10% wide until the forwarder got twice as fast:
at 10k pending that made them ~30 ms, shorter than one checkpoint and ack flush, and
one run read 0.67 where reruns read 0.90-1.00.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    QUICK,
    ROOT,
    Relay,
    build_backlog,
    fleet,
    loadavg,
    print_header,
    print_table,
    progress,
    workdir,
)
from bench.forward import drain

FLEET = 1000


def window_rate(times: list[float], lo: float, hi: float) -> float:
    a, b = int(len(times) * lo), int(len(times) * hi) - 1
    if b <= a or times[b] <= times[a]:
        return float("nan")
    return (b - a) / (times[b] - times[a])


def status_seconds(config: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "relay", "status", "--config", str(config)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.perf_counter() - started


def measure(directory: Path, total: int, concurrency: int, event_loop: str) -> dict[str, Any]:
    pending = total // 10
    db = directory / "outbox.sqlite3"
    progress(f"{total:,} rows: building ({pending:,} pending)")
    started = time.perf_counter()
    build_backlog(db, total, pending, FLEET)
    build = time.perf_counter() - started
    # The config file the relay will use, written without starting it.
    config = Relay(directory, db, "http://127.0.0.1:9/", fleet(FLEET)).config
    status = min(status_seconds(config) for _ in range(3))
    progress(f"{total:,} rows: draining {pending:,}")
    r = drain(directory, db, concurrency, FLEET, event_loop)
    times = r.pop("times")
    return {
        "rows": total,
        "pending": pending,
        "build_s": build,
        "db_mb": db.stat().st_size / 2**20,
        "status_s": status,
        "startup_s": r["startup_s"],
        "rate_start": window_rate(times, 0.05, 0.25),
        "rate_end": window_rate(times, 0.75, 0.95),
        "rate": r["rate"],
        "peak_rss_mb": r["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    default = [1_000, 3_000] if QUICK else [10_000, 100_000, 1_000_000]
    p.add_argument("--rows", type=int, nargs="+", default=default)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    sizes = ", ".join(f"{n:,}" for n in args.rows)
    print_header(f"backlog: outboxes of {sizes} rows, event loop {args.event_loop}")
    results: dict[str, Any] = {"load_before": loadavg(), "sizes": []}
    for total in args.rows:
        with workdir(f"backlog-{total}") as directory:
            results["sizes"].append(measure(directory, total, args.concurrency, args.event_loop))
    results["load_after"] = loadavg()
    table = [
        [
            f"{s['rows']:,}",
            f"{s['pending']:,}",
            s["db_mb"],
            s["startup_s"],
            s["status_s"],
            s["rate_start"],
            s["rate_end"],
            s["rate_end"] / s["rate_start"],
            s["peak_rss_mb"],
        ]
        for s in results["sizes"]
    ]
    print_table(
        [
            "rows",
            "pending",
            "file MB",
            "start→ready s",
            "status s",
            "drain/s at start",
            "drain/s at end",
            "end÷start",
            "peak RSS MB",
        ],
        table,
    )
    print(
        f"goals: ready ≤ 2 s, status ≤ 1 s, end÷start ≥ 0.9, RSS ≤ 150 MB;"
        f" load {results['load_before']} -> {results['load_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
