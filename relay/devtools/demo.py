"""``cartrack-relay demo``: the whole product on one machine, in one process.

It runs the real relay (``create_app``, a real outbox file under ``--dir``), a
Cartrack stand-in that validates every event against Cartrack's spec, and a Frotcom
simulator posting minute-style batches for a small fleet, and shows one live
progress line until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from relay.app import create_app
from relay.config import Config, parse_config
from relay.devtools.fake_cartrack import FakeCartrack
from relay.devtools.simulator import SimulatorStats, fleet, simulate
from relay.logging import configure_logging
from relay.state import OUTBOX, STATE

DEMO_TOKEN = "demo-token-0000-0000"
DEMO_API_KEY = "demo-api-key"
PROGRESS_SECONDS = 0.5


def _prepare(directory: Path) -> Path:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def demo_config(directory: Path, cartrack_url: str, vehicles: int) -> Config:
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_seconds": 5},
            "frotcom": {"tokens": [DEMO_TOKEN]},
            "cartrack": {"url": cartrack_url, "api_key": DEMO_API_KEY, "timeout_seconds": 5},
            "outbox": {"path": str(directory / "outbox.sqlite3")},
            "retry": {"initial_seconds": 0.5, "max_seconds": 5.0},
            "vehicles": fleet(vehicles),
        },
        env={},
        cwd=directory,
    )


async def run_demo(
    directory: Path,
    vehicles: int = 5,
    duration: float | None = None,
    interval: float = 3.0,
    out: TextIO | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    out = sys.stdout if out is None else out
    # Logs would tear the progress line apart; only problems are shown.
    configure_logging("warning", json=False, stream=sys.stderr)
    directory = await asyncio.to_thread(_prepare, directory)
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    cartrack = FakeCartrack(api_key=DEMO_API_KEY, latency=0.01)
    cartrack_url = await cartrack.start()
    config = demo_config(directory, cartrack_url, vehicles)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        webhook = f"http://{host}:{port}{config.server.path}"
        print(f"relay    {webhook}", file=out)
        print(f"cartrack {cartrack_url}  (stand-in, validates every event)", file=out)
        print(f"outbox   {config.outbox.path}", file=out)
        print(
            f"fleet    {vehicles} vehicles, one Frotcom batch every {interval:g}s"
            + (f", for {duration:g}s" if duration else ", Ctrl-C to stop"),
            file=out,
        )
        stats = SimulatorStats()
        simulator = asyncio.create_task(
            simulate(
                webhook, DEMO_TOKEN, vehicles, interval, duration=duration, stop=stop, stats=stats
            ),
            name="simulator",
        )
        line = _progress(app, cartrack, out)
        while not simulator.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(simulator), PROGRESS_SECONDS)
            await line()
        simulator.result()
        # Give the forwarder a bounded moment to deliver the last batch.
        deadline = loop.time() + 10
        while loop.time() < deadline and not stop.is_set():
            counts = await app[OUTBOX].counts()
            if counts["pending"] == 0:
                break
            await line()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_SECONDS)
        await line(final=True)
        rejected = sum(n for status, n in cartrack.stats.items() if status >= 400)
        print(
            f"\nCartrack stand-in accepted {len(cartrack.accepted)} events"
            f" ({rejected} answered with an error).",
            file=out,
        )
        print(
            f"Look inside:  sqlite3 {config.outbox.path} "
            '"SELECT status, count(*) FROM positions GROUP BY status"',
            file=out,
        )
    finally:
        stop.set()
        await runner.cleanup()
        await cartrack.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
    return 0


def _progress(app: web.Application, cartrack: FakeCartrack, out: TextIO) -> Callable[..., Any]:
    tty = out.isatty()
    last_printed = ""

    async def line(final: bool = False) -> None:
        nonlocal last_printed
        # This run's flow (the outbox in --dir may hold earlier runs) and the outbox now.
        counts = await app[OUTBOX].counts()
        state = app[STATE]
        sent = state.forwarder.stats["sent"] if state.forwarder is not None else 0
        text = (
            f"received {state.stats['received']:>6} | stored {state.stats['stored']:>6} | "
            f"sent {sent:>6} | pending {counts['pending']:>5} | "
            f"held {counts['held']:>3} | failed {counts['failed']:>3} | "
            f"cartrack got {len(cartrack.accepted):>6}"
        )
        if tty:
            print("\r" + text, end="\n" if final else "", file=out, flush=True)
        elif final or text != last_printed:
            # Not a terminal (CI, a pipe): one line per change instead of redrawing.
            print(text, file=out, flush=True)
        last_printed = text

    return line
