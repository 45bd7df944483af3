"""Bench 4, mixed and sustained: ingest and forward at once at a steady offered load.

The relay (``serve``) takes 100-position batches from 8 paced senders (bench/loadgen.py
with ``--rate``) while it forwards everything to the lean stand-in. A load is
*sustained* when the senders got every batch acknowledged on schedule and the number
of pending rows did not grow over the second half of the run (at most half a second
of offered load more at the end than at the middle). Short probes raise the load by
1.5x until one fails, one probe splits the last step, and the best load is then held
for the full duration; the relay's CPU time per 1,000 positions is measured there.
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
    StandIn,
    cpu_seconds,
    fleet,
    loadavg,
    loadgen_args,
    pending_count,
    print_header,
    print_table,
    progress,
    workdir,
)

FLEET = 1000
SENDERS = 8


def attempt(rate: float, duration: float, event_loop: str) -> dict[str, Any]:
    batches = max(1, int(rate * duration / 100))
    base_ms = int(time.time() * 1000) - batches * 10_000 - 3_600_000
    with workdir("mixed") as directory, StandIn() as standin:
        db = directory / "outbox.sqlite3"
        with Relay(directory, db, standin.url, fleet(FLEET), event_loop=event_loop) as relay:
            cpu0 = cpu_seconds(relay.pid)
            sent0 = standin.stats()["count"]
            gen = subprocess.Popen(
                [
                    sys.executable,
                    *loadgen_args(
                        relay.url,
                        SENDERS,
                        batches,
                        base_ms,
                        duration * 1.5 + 5,
                        fleet_size=FLEET,
                        rate=rate,
                    ),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            samples: list[tuple[float, int]] = []
            started = time.monotonic()
            while gen.poll() is None and time.monotonic() - started < duration * 2 + 30:
                samples.append((time.monotonic() - started, pending_count(db)))
                time.sleep(1.0)
            out, err = gen.communicate(timeout=60)
            if gen.returncode != 0:
                raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
            load = json.loads(out.decode().strip().splitlines()[-1])
            cpu = cpu_seconds(relay.pid) - cpu0
            forwarded = standin.stats()["count"] - sent0
    mid = [n for t, n in samples if t >= load["elapsed"] / 2] or [0]
    end = samples[-1][1] if samples else 0
    growth = end - mid[0]
    # Over the scheduled time at least: the last batch is due at the end, not before.
    span = max(load["elapsed"], duration)
    achieved = load["positions"] / span
    ok = (
        load["errors"] == 0
        and load["positions"] >= batches * 100
        and achieved >= 0.97 * rate
        and growth <= rate * 0.5
    )
    return {
        "offered": rate,
        "achieved": achieved,
        "forwarded_rate": forwarded / span,
        "pending_growth": growth,
        "pending_end": end,
        "p99_ms": load["p99_ms"],
        "errors": load["errors"],
        "cpu_ms_per_1000": cpu * 1000 / max(1, load["positions"]) * 1000,
        "sustained": ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--start", type=float, default=200 if QUICK else 1000)
    p.add_argument("--probe-seconds", type=float, default=2 if QUICK else 15)
    p.add_argument("--duration", type=float, default=3 if QUICK else 60)
    p.add_argument("--max-probes", type=int, default=2 if QUICK else 8)
    p.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    print_header(
        f"mixed: ingest + forward, {args.duration:g} s at the best steady load,"
        f" event loop {args.event_loop}"
    )
    results: dict[str, Any] = {"load_before": loadavg(), "probes": []}
    rate, best, failed = args.start, 0.0, 0.0
    for _ in range(args.max_probes):
        progress(f"probe {rate:,.0f} positions/s for {args.probe_seconds:g} s")
        r = attempt(rate, args.probe_seconds, args.event_loop)
        results["probes"].append(r)
        if not r["sustained"]:
            failed = rate
            break
        best, rate = rate, rate * 1.5
    if failed and best:
        middle = (best + failed) / 2
        progress(f"probe {middle:,.0f} positions/s for {args.probe_seconds:g} s")
        r = attempt(middle, args.probe_seconds, args.event_loop)
        results["probes"].append(r)
        if r["sustained"]:
            best = middle
    best = best or args.start
    holds: list[dict[str, Any]] = []
    for _ in range(3):
        progress(f"holding {best:,.0f} positions/s for {args.duration:g} s")
        holds.append(attempt(best, args.duration, args.event_loop))
        if holds[-1]["sustained"]:
            break
        best *= 0.85
    final = holds[-1]
    results.update(holds=holds, final=final)
    results["load_after"] = loadavg()
    rows = [
        [
            f"{r['offered']:,.0f}",
            r["achieved"],
            r["forwarded_rate"],
            r["pending_growth"],
            r["p99_ms"],
            r["cpu_ms_per_1000"],
            "yes" if r["sustained"] else "no",
        ]
        for r in [*results["probes"], *holds]  # every hold: a failed one is a finding too
    ]
    print_table(
        [
            "offered pos/s",
            "ingested/s",
            "forwarded/s",
            "pending growth",
            "ack p99 ms",
            "CPU ms/1000 pos",
            "sustained",
        ],
        rows,
    )
    verdict = "sustained" if final["sustained"] else "NOT sustained"
    print(
        f"highest steady load: {final['offered']:,.0f} positions/s for {args.duration:g} s"
        f" ({verdict}); relay CPU {final['cpu_ms_per_1000']:,.0f} ms per 1,000 positions;"
        f" load {results['load_before']} -> {results['load_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
