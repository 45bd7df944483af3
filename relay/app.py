"""``create_app(config)``: the one place that builds the relay, for ``serve`` and tests.

Lifecycle is a chain of ``cleanup_ctx`` generators: (the monitoring listener, when
``[metrics] port`` is set,) open the outbox, start the forwarder, start maintenance;
they unwind in reverse, so the outbox closes last.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import structlog
from aiohttp import web

from relay.cartrack import CartrackClient
from relay.config import Config
from relay.forwarder import RESCAN_SECONDS, Forwarder
from relay.health import probe_listener, probe_routes
from relay.outbox.storage import Outbox
from relay.state import OUTBOX, STATE, RelayState
from relay.timeutil import Clock, format_epoch, system_clock
from relay.web import add_routes, json_errors, request_context

log = structlog.get_logger("relay.app")

PURGE_INTERVAL_SECONDS = 3600.0
# How often summaries of repeated delivery failures are written (their window is 60 s).
SUMMARY_INTERVAL_SECONDS = 10.0


def create_app(
    config: Config,
    *,
    clock: Clock = system_clock,
    rand: Callable[[], float] = random.random,
    rescan_seconds: float = RESCAN_SECONDS,
) -> web.Application:
    # The body limit is enforced by the handler with a JSON 413; aiohttp's own limit
    # only has to stay out of its way.
    app = web.Application(
        client_max_size=config.server.max_body_bytes + 1,
        middlewares=[request_context, json_errors],
    )
    state = app[STATE] = RelayState(
        config=config,
        clock=clock,
        vehicles=config.vehicles,
        tokens=tuple(t.encode() for t in config.frotcom.tokens),
    )
    state.metrics.paused = lambda: state.forwarder is not None and state.forwarder.pause is not None
    add_routes(app, config.server.path)
    if config.metrics.port is None:
        app.add_routes(probe_routes(app))
    else:
        app.cleanup_ctx.append(probe_listener)

    async def outbox_ctx(app: web.Application) -> AsyncIterator[None]:
        # Resolved by the first supervised task to die (see supervise); serve waits on it.
        app[STATE].fatal = asyncio.get_running_loop().create_future()
        outbox = await Outbox.open(config.outbox.path, clock, config.outbox.min_free_bytes)
        app[OUTBOX] = outbox
        log.info("outbox_opened", path=str(config.outbox.path))
        writer = supervise(app, outbox.watch_writer(), "outbox-writer")
        try:
            yield
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await outbox.close()
            log.info("outbox_closed")

    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        outbox = app[OUTBOX]
        # Held rows of vehicles mapped since the last run go out now.
        released = await outbox.release_held(state.vehicles)
        if released:
            log.info("held_released", vehicles=len(released), rows=sum(released.values()))
        client = CartrackClient(
            config.cartrack.url,
            config.cartrack.api_key,
            config.cartrack.timeout_seconds,
            concurrency=config.cartrack.concurrency,
            clock=clock,
            on_response=state.metrics.cartrack_response,
        )
        forwarder = Forwarder(
            outbox,
            client,
            state.vehicles,
            config.retry,
            config.cartrack.concurrency,
            clock=clock,
            rand=rand,
            rescan_seconds=rescan_seconds,
            metrics=state.metrics,
        )
        state.forwarder = forwarder
        state.forwarder_task = supervise(app, forwarder.run(), "forwarder")
        summaries = supervise(app, summary_loop(forwarder), "failure-summaries")
        try:
            yield
        finally:
            await forwarder.stop()
            summaries.cancel()
            await asyncio.gather(summaries, return_exceptions=True)
            timeout = config.server.shutdown_timeout_seconds
            if state.stopping_since is not None:
                elapsed = asyncio.get_running_loop().time() - state.stopping_since
                timeout = max(0.0, timeout - elapsed)
            await _bounded(state.forwarder_task, timeout)
            forwarder.failures.flush(force=True)  # no count of repeats goes unsaid
            await client.close()
            log.info("forwarder_stopped", **dict(forwarder.stats))

    async def maintenance_ctx(app: web.Application) -> AsyncIterator[None]:
        if config.outbox.keep_sent_days <= 0:
            yield
            return
        task = supervise(app, purge_loop(app), "purge")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.extend([outbox_ctx, forwarder_ctx, maintenance_ctx])
    app.on_shutdown.append(_stop_forwarder)
    return app


async def _stop_forwarder(app: web.Application) -> None:
    # on_shutdown runs once the listener is closed, while in-flight webhook requests are
    # still finishing: lanes stop at their next wait, and the shutdown bound starts now.
    state = app[STATE]
    state.stopping_since = asyncio.get_running_loop().time()
    if state.forwarder is not None:
        await state.forwarder.stop()


def supervise(
    app: web.Application, coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Run a background task whose death stops the service loudly."""
    task = asyncio.create_task(coro, name=name)

    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        fatal = app[STATE].fatal
        if exc is not None:
            log.critical("task_crashed", task=name, exc_info=exc)
        elif not _stopping(app):
            exc = RuntimeError(f"background task {name} exited unexpectedly")
            log.critical("task_exited", task=name)
        else:
            return
        if fatal is not None and not fatal.done():
            fatal.set_result(exc)

    task.add_done_callback(done)
    return task


def _stopping(app: web.Application) -> bool:
    forwarder = app[STATE].forwarder
    return forwarder is None or forwarder.stopping


async def _bounded(task: asyncio.Task[None] | None, timeout: float) -> None:
    if task is None:
        return
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        # Cancelled requests leave their rows pending: they go out after the restart.
        log.warning("shutdown_timeout", task=task.get_name(), timeout=round(timeout, 3))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def purge_loop(app: web.Application) -> None:
    state = app[STATE]
    outbox = app[OUTBOX]
    keep = state.config.outbox.keep_sent_days * 86400
    interval = min(PURGE_INTERVAL_SECONDS, keep / 4)
    while True:
        cutoff = format_epoch(state.clock() - keep)
        try:
            deleted = await outbox.purge_sent(cutoff)
        except sqlite3.OperationalError as exc:
            # A busy or full disk is no reason to stop the relay; the next round retries.
            log.error("purge_failed", error=str(exc))
        else:
            if deleted:
                log.info("sent_purged", rows=deleted, before=cutoff)
        await asyncio.sleep(interval)


async def summary_loop(forwarder: Forwarder) -> None:
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_SECONDS)
        forwarder.failures.flush()


async def reload_vehicles(app: web.Application, vehicles: Mapping[str, str]) -> dict[str, int]:
    """Apply a new vehicle map (SIGHUP): held rows of newly mapped vehicles go out now."""
    state = app[STATE]
    added = sorted(set(vehicles) - set(state.vehicles))
    removed = sorted(set(state.vehicles) - set(vehicles))
    state.vehicles = vehicles
    forwarder = state.forwarder
    if forwarder is not None:
        forwarder.set_vehicles(vehicles)
    outbox = app[OUTBOX]
    released = await outbox.release_held(vehicles)
    if forwarder is not None and released:
        forwarder.notify(released)
    held = 0
    if removed:
        # Held now rather than when a lane next looks, which may be after a long backoff.
        # Delivered rows are recorded first so they end 'sent', not 'held'.
        if forwarder is not None:
            await forwarder.flush_acks()
        for vehicle_id in removed:
            # Checked at each step: a second reload may have mapped it again meanwhile.
            if vehicle_id not in state.vehicles:
                held += await outbox.hold_vehicle(vehicle_id)
    log.info(
        "vehicles_reloaded",
        vehicles=len(vehicles),
        added=len(added),
        removed=len(removed),
        released_rows=sum(released.values()),
        held_rows=held,
    )
    return released
