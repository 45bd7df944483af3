"""Bench 2, forward: drain a backlog to a local Cartrack stand-in, against a bare client.

The relay (``serve`` in its own process) starts on an outbox holding the backlog and
sends it to the lean stand-in (bench/standin.py); the clock runs from the first
request the stand-in sees until the last row reads ``sent`` in the outbox, so marking
rows sent is included. The ceiling is a bare aiohttp client (bench/fwdclient.py)
posting the same events to the same stand-in at the same concurrency. Beside it, the
same bare client on the relay's own transport (relay.http1): what the relay would do
if the outbox, the lanes and marking rows sent cost nothing. Ceiling and relay runs
alternate for a few rounds, and the table gives medians with every run printed below
it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    QUICK,
    Relay,
    StandIn,
    add_comparison_options,
    build_backlog,
    cpu_seconds,
    fleet,
    loadavg,
    peak_rss_mb,
    pending_count,
    print_header,
    print_table,
    progress,
    remove,
    run_json,
    workdir,
)

FLEET = 500


def drain(
    directory: Path,
    db: Path,
    concurrency: int,
    fleet_size: int,
    event_loop: str = "asyncio",
    bound: float = 600.0,
) -> dict[str, Any]:
    """Start the relay on ``db`` and time the drain of every pending row."""
    expected = pending_count(db)
    with StandIn() as standin:
        relay = Relay(
            directory,
            db,
            standin.url,
            fleet(fleet_size),
            concurrency=concurrency,
            event_loop=event_loop,
        )
        with relay:
            startup = relay.startup_seconds
            cpu_ready = cpu_seconds(relay.pid)
            deadline = time.monotonic() + bound
            left = expected
            while time.monotonic() < deadline:
                left = pending_count(db)
                if left == 0:
                    break
                time.sleep(0.1)
            done = time.time()
            cpu = cpu_seconds(relay.pid) - cpu_ready
            rss = peak_rss_mb(relay.pid)
        stats = standin.stats(times=True)
    if left:
        raise RuntimeError(f"drain did not finish within {bound}s: {left} rows pending")
    times: list[float] = stats["times"]
    return {
        "events": expected,
        "requests": stats["count"],
        "startup_s": startup,
        "elapsed": done - times[0],
        "rate": expected / (done - times[0]),
        "times": times,
        "cpu_s": cpu,
        "peak_rss_mb": rss,
    }


def ceiling(
    db: Path, concurrency: int, fleet_size: int, client: str = "aiohttp"
) -> tuple[float, float]:
    """Events/s of a bare client, and its CPU ms per 1,000 events."""
    with StandIn() as standin:
        r = run_json(
            [
                "-m",
                "bench.fwdclient",
                "--db",
                str(db),
                "--url",
                standin.url,
                "--concurrency",
                str(concurrency),
                "--fleet",
                str(fleet_size),
                "--client",
                client,
            ],
            timeout=600,
        )
    if r["errors"]:
        raise RuntimeError(f"ceiling client saw {r['errors']} errors")
    return r["events"] / r["elapsed"], r["cpu_s"] * 1e6 / r["events"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=500 if QUICK else 50_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    add_comparison_options(p, rounds=2)
    args = p.parse_args(argv)
    print_header(f"forward: drain {args.events:,} pending events, {args.rounds} round(s)")
    results: dict[str, Any] = {"load_before": loadavg(), "runs": {}}
    table = []
    with workdir("forward") as directory:
        progress(f"building a backlog of {args.events:,} events")
        template = directory / "backlog.sqlite3"
        build_backlog(template, args.events, args.events, FLEET)
        for c in args.concurrency:
            # The ceiling before, between and after the relay's runs: the machine drifts
            # by tens of percent within minutes, and a median of interleaved runs does not.
            ceilings: list[tuple[float, float]] = []
            transport: list[tuple[float, float]] = []
            relays: dict[str, list[dict[str, Any]]] = {loop: [] for loop in args.event_loops}
            for n in range(1, args.rounds + 1):
                progress(f"round {n}: ceiling, concurrency {c}")
                ceilings.append(ceiling(template, c, FLEET))
                progress(f"round {n}: bare http1 client, concurrency {c}")
                transport.append(ceiling(template, c, FLEET, "http1"))
                for loop in args.event_loops:
                    progress(f"round {n}: relay, concurrency {c}, {loop}")
                    run_dir = directory / f"relay-{c}-{loop}-{n}"
                    run_dir.mkdir()
                    db = run_dir / "outbox.sqlite3"
                    shutil.copy(template, db)
                    r = drain(run_dir, db, c, FLEET, loop)
                    del r["times"]
                    relays[loop].append(r)
                    remove(run_dir)
            progress(f"ceiling once more, concurrency {c}")
            ceilings.append(ceiling(template, c, FLEET))
            bare = statistics.median(rate for rate, _ in ceilings)
            lean = statistics.median(rate for rate, _ in transport)
            results["runs"][c] = {"ceiling": ceilings, "http1": transport, "relay": relays}
            table.append(
                [
                    f"bare aiohttp client, concurrency {c} (ceiling)",
                    bare,
                    statistics.median(cpu for _, cpu in ceilings),
                    1.0,
                    bare / lean,
                ]
            )
            table.append(
                [
                    f"bare http1 client, concurrency {c} (relay's transport)",
                    lean,
                    statistics.median(cpu for _, cpu in transport),
                    lean / bare,
                    1.0,
                ]
            )
            for loop, rs in relays.items():
                rate = statistics.median(r["rate"] for r in rs)
                table.append(
                    [
                        f"relay, concurrency {c}, {loop}",
                        rate,
                        statistics.median(r["cpu_s"] * 1e6 / r["events"] for r in rs),
                        rate / bare,
                        rate / lean,
                    ]
                )
    results["load_after"] = loadavg()
    print_table(["forward", "events/s", "CPU ms/1000 events", "x ceiling", "x bare http1"], table)
    runs = []
    for c, v in results["runs"].items():
        runs.append(f"c={c} ceiling " + ", ".join(f"{rate:,.0f}" for rate, _ in v["ceiling"]))
        runs.append(f"c={c} http1 " + ", ".join(f"{rate:,.0f}" for rate, _ in v["http1"]))
        runs += [
            f"c={c} {loop} " + ", ".join(f"{r['rate']:,.0f}" for r in rs)
            for loop, rs in v["relay"].items()
        ]
    print(
        "medians of the runs; every run (events/s): "
        + "; ".join(runs)
        + f"; load {results['load_before']} -> {results['load_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
