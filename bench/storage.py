"""The relay's storage path without HTTP, for bench.ingest's table: where the gap goes.

Two measurements of the webhook's write path, on the same bodies the load generator
sends, between the ceiling (plain sqlite3) and the relay end to end (``serve`` under
HTTP load):

- ``alone``: the jobs the webhook makes for those bodies (parsed beforehand: that is
  the event loop's work), committed a few at a time by ``writer.run_group`` on a
  connection set up as the daemon's writer, in one thread. What the relay's own SQL,
  transactions and Python around them cost, with nothing running beside them.
- ``beside_loop``: the daemon's ``Outbox`` as ``serve`` runs it (writer thread,
  checkpoints, state cache), fed by N coroutines on one event loop that each parse a
  body and await ``store_batch``, as N webhook requests would, with serve's GIL
  switch interval and GC settings. What running the writer beside the loop costs,
  still without HTTP.

The rest of the way to the end-to-end figure is HTTP: aiohttp, the middlewares, the
response, the log line and the kernel's loopback TCP.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import PROVIDER, percentile
from relay.frotcom import parse_body
from relay.outbox.batch import batch_job
from relay.outbox.schema import connect
from relay.outbox.states import VehicleStates
from relay.outbox.storage import WRITER_CACHED_STATEMENTS, Outbox, writer_pragmas
from relay.outbox.writer import Job, run_group
from relay.serve import SWITCH_INTERVAL, tune_gc

MAX_FUTURE_MS = 86_400_000  # frotcom.max_future_seconds' default; the bodies are in the past


def alone(directory: Path, bodies: list[bytes], received_ms: int, per_group: int) -> dict[str, Any]:
    """Positions/s and CPU per 1,000 of the storage path alone, ``per_group`` jobs a group.

    At 8 senders the relay's groups hold about 4 requests (two cohorts of senders take
    turns); pass that.
    """
    db = directory / f"storage-alone-{time.monotonic_ns()}.sqlite3"
    os.sync()  # as the ceiling: the run before it settled on disk
    connect(db, create=True).close()
    conn = sqlite3.connect(db, isolation_level=None, cached_statements=WRITER_CACHED_STATEMENTS)
    for pragma in writer_pragmas():
        conn.execute(pragma)
    states = VehicleStates()
    jobs = [
        batch_job(parse_body(body, received_ms, MAX_FUTURE_MS), {}, PROVIDER, received_ms, states)
        for body in bodies
    ]
    positions = sum(job.positions for job in jobs)
    loop = asyncio.new_event_loop()  # run_group settles nothing: futures only mark jobs live
    try:
        started = time.perf_counter()
        cpu_started = time.thread_time()
        for start in range(0, len(jobs), per_group):
            group = [Job(job, loop.create_future()) for job in jobs[start : start + per_group]]
            outcomes, retry, _ = run_group(conn, group, states)
            errors = [o for _, o in outcomes if isinstance(o, BaseException)]
            if errors:
                raise errors[0]
            if retry:
                raise RuntimeError("SQLite lost a transaction of the storage bench")
        elapsed = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
    finally:
        loop.close()
    stored = conn.execute("SELECT count(*) FROM positions").fetchone()[0]
    conn.close()
    if stored != positions:
        raise RuntimeError(f"stored {stored} of {positions} positions")
    return {"rate": stored / elapsed, "cpu_ms_per_1000": cpu * 1e6 / max(1, stored)}


def beside_loop(
    directory: Path, bodies: list[bytes], received_ms: int, tasks: int
) -> dict[str, Any]:
    """Positions/s, store latency p50/p99 (ms) and process CPU per 1,000, without HTTP."""
    db = directory / f"storage-loop-{tasks}-{time.monotonic_ns()}.sqlite3"
    os.sync()
    with _as_serve():
        return asyncio.run(_beside_loop(db, bodies, received_ms, tasks))


async def _beside_loop(
    db: Path, bodies: list[bytes], received_ms: int, tasks: int
) -> dict[str, Any]:
    outbox = await Outbox.open(db)
    latencies: list[float] = []
    accepted = 0
    queue = iter(bodies)

    async def sender() -> None:
        nonlocal accepted
        for body in queue:
            sent = time.perf_counter()
            batch = parse_body(body, received_ms, MAX_FUTURE_MS)
            result = await outbox.store_batch(batch, {}, PROVIDER, received_ms)
            latencies.append(time.perf_counter() - sent)
            accepted += result.accepted

    try:
        started = time.perf_counter()
        cpu_started = time.process_time()
        await asyncio.gather(*(sender() for _ in range(tasks)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await outbox.close()
    return {
        "rate": accepted / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "cpu_ms_per_1000": cpu * 1e6 / max(1, accepted),
    }


@contextmanager
def _as_serve() -> Iterator[None]:
    """serve's GIL switch interval and GC settings (relay.serve), restored afterwards."""
    interval = sys.getswitchinterval()
    threshold = gc.get_threshold()
    sys.setswitchinterval(SWITCH_INTERVAL)
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
        sys.setswitchinterval(interval)
