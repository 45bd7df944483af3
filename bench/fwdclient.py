"""The forward ceiling: a bare aiohttp client posting the outbox's events, nothing else.

Same events (with their VIN), same stand-in, same concurrency as the relay, no outbox
reads or writes. ``python -m bench.fwdclient --db PATH --url URL --concurrency N``
prints one JSON line: events, errors, elapsed seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time

import aiohttp

from bench.common import API_KEY, fleet
from relay.mapping import with_vin


def load_events(db: str, fleet_size: int) -> list[bytes]:
    vins = fleet(fleet_size)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [
            with_vin(payload, vins[vid])
            for vid, payload in conn.execute(
                "SELECT vehicle_id, payload FROM positions WHERE status = 'pending' ORDER BY id"
            )
        ]
    finally:
        conn.close()


async def post_all(
    url: str, events: list[bytes], concurrency: int, bound: float
) -> dict[str, object]:
    headers = {"Content-Type": "application/json", "X-API-KEY": API_KEY}
    errors = 0
    sent = 0
    index = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + bound

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, sent, index
        while index < len(events) and time.perf_counter() < deadline:
            body = events[index]
            index += 1
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        sent += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, OSError):
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {
        "events": sent,
        "errors": errors,
        "elapsed": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--fleet", type=int, required=True)
    p.add_argument("--duration", type=float, default=300.0, help="hard bound, seconds")
    args = p.parse_args(argv)
    events = load_events(args.db, args.fleet)
    result = asyncio.run(post_all(args.url, events, args.concurrency, args.duration))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
