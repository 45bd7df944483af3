"""Frotcom stand-in for the benches: N concurrent senders posting 100-position batches.

Runs in its own process (``python -m bench.loadgen ...``) so its work does not steal
the relay's event loop. Bodies are encoded before the clock starts. Prints one JSON
line: requests, positions acknowledged, errors, elapsed seconds, ack latencies.

``--rate`` (positions/s) paces the requests on a fixed schedule (offered load);
without it every sender posts as fast as the relay answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from bench.common import TOKEN, percentile, positions_body


async def run(args: argparse.Namespace) -> dict[str, object]:
    bodies = [
        json.dumps(positions_body(args.first_batch + i, args.base_ms, args.fleet)).encode()
        for i in range(args.batches)
    ]
    per_request = 100
    interval = per_request / args.rate if args.rate else 0.0
    latencies: list[float] = []
    acked = 0
    errors = 0
    late = 0
    next_index = 0
    headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.senders)
    started = time.perf_counter()
    deadline = started + args.duration

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal acked, errors, late, next_index
        while next_index < len(bodies) and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            if interval:
                due = started + index * interval
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -interval:
                    late += 1
            sent = time.perf_counter()
            try:
                async with session.post(args.url, data=bodies[index], headers=headers) as r:
                    answer = await r.json()
                    if r.status == 200:
                        acked += int(answer["accepted"]) + int(answer["duplicates"])
                    else:
                        errors += 1
            except (aiohttp.ClientError, OSError):
                errors += 1
            latencies.append(time.perf_counter() - sent)

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(sender(session) for _ in range(args.senders)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "positions": acked,
        "errors": errors,
        "late": late,
        "elapsed": elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--first-batch", type=int, default=0)
    p.add_argument("--fleet", type=int, default=1000)
    p.add_argument("--base-ms", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="offered positions/s (0: closed loop)")
    p.add_argument("--duration", type=float, default=120.0, help="hard bound, seconds")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
