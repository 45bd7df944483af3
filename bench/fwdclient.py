"""The forward ceiling: a bare client posting the outbox's events, nothing else.

Same events (with their VIN), same stand-in, same concurrency as the relay, no outbox
reads or writes. ``--client aiohttp`` (the issue's ceiling) posts with aiohttp's
ClientSession; ``--client http1`` with ``relay.http1.Http1Client``, the transport the
relay itself uses, so the relay's own overhead shows against it.
``python -m bench.fwdclient --db PATH --url URL --concurrency N`` prints one JSON
line: events, errors, elapsed seconds, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp

from bench.common import API_KEY, fleet
from relay.http1 import Http1Client
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
    url: str, events: list[bytes], concurrency: int, bound: float, kind: str = "aiohttp"
) -> dict[str, object]:
    headers = {"Content-Type": "application/json", "X-API-KEY": API_KEY}
    errors = 0
    sent = 0
    index = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + bound

    async def worker(post: Callable[[bytes], Awaitable[int]]) -> None:
        nonlocal errors, sent, index
        while index < len(events) and time.perf_counter() < deadline:
            body = events[index]
            index += 1
            try:
                status = await post(body)
            except (aiohttp.ClientError, OSError):
                errors += 1
            else:
                if status == 200:
                    sent += 1
                else:
                    errors += 1

    if kind == "http1":
        client = Http1Client(url, headers, limit=concurrency, body_limit=4096)

        async def lean_post(body: bytes) -> int:
            return (await client.post(body, 300.0)).status

        try:
            await asyncio.gather(*(worker(lean_post) for _ in range(concurrency)))
        finally:
            await client.close()
    else:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def aiohttp_post(body: bytes) -> int:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    return r.status

            await asyncio.gather(*(worker(aiohttp_post) for _ in range(concurrency)))
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
    p.add_argument("--client", choices=("aiohttp", "http1"), default="aiohttp")
    args = p.parse_args(argv)
    events = load_events(args.db, args.fleet)
    result = asyncio.run(post_all(args.url, events, args.concurrency, args.duration, args.client))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
