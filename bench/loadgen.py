"""Frotcom stand-in for the benches: N concurrent senders posting 100-position batches.

Runs in its own process (``python -m bench.loadgen ...``) so its work does not steal
the relay's event loop. Whole requests (head and body) are encoded before the clock
starts. Prints one JSON line: requests, positions acknowledged, errors, elapsed
seconds, ack latencies.

Each sender is one keep-alive HTTP/1.1 connection written and read with asyncio
streams, not aiohttp's client: on this 2-core machine the load generator shares the
cores with the relay, and aiohttp's client cost ~12 us of CPU per position sent
(1.2 ms per request), a third of a core taken from the relay under test. Frotcom's
senders are not on the relay's machine; the leaner the generator, the closer the
bench is to that.

``--rate`` (positions/s) paces the requests on a fixed schedule (offered load);
without it every sender posts as fast as the relay answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from yarl import URL

from bench.common import TOKEN, per_vehicle, percentile, positions_body


class HttpError(Exception):
    pass


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise HttpError("no Content-Length")
    return status, await reader.readexactly(length)


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = URL(args.url)
    host, port = url.host or "127.0.0.1", url.port or 80
    requests = []
    for i in range(args.batches):
        batch_no = args.first_batch + i
        per = per_vehicle(batch_no, args.vary)
        body = json.dumps(positions_body(batch_no, args.base_ms, args.fleet, per_vehicle=per))
        body = body.encode()
        head = (
            f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    per_request = 100
    interval = per_request / args.rate if args.rate else 0.0
    latencies: list[float] = []
    acked = 0
    errors = 0
    late = 0
    next_index = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + args.duration

    async def sender() -> None:
        nonlocal acked, errors, late, next_index
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while next_index < len(requests) and time.perf_counter() < deadline:
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
                    if connection is None:
                        connection = await asyncio.open_connection(host, port)
                    reader, writer = connection
                    writer.write(requests[index])
                    status, body = await asyncio.wait_for(_answer(reader), args.duration)
                    if status == 200:
                        answer = json.loads(body)
                        acked += int(answer["accepted"]) + int(answer["duplicates"])
                    else:
                        errors += 1
                except (OSError, asyncio.IncompleteReadError, HttpError, ValueError, TimeoutError):
                    errors += 1
                    if connection is not None:
                        connection[1].close()
                    connection = None  # a fresh connection for the next request
                latencies.append(time.perf_counter() - sent)
        finally:
            if connection is not None:
                connection[1].close()

    await asyncio.gather(*(sender() for _ in range(args.senders)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {
        "requests": len(latencies),
        "positions": acked,
        "errors": errors,
        "late": late,
        "elapsed": elapsed,
        # The generator's own CPU while sending (it shares the cores with the relay).
        "cpu_s": cpu,
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
    p.add_argument(
        "--vary", action="store_true", help="batches of 10-190 positions (mean 100), not all 100"
    )
    p.add_argument("--base-ms", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="offered positions/s (0: closed loop)")
    p.add_argument("--duration", type=float, default=120.0, help="hard bound, seconds")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
