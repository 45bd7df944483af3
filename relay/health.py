"""Monitoring endpoints: /healthz (alive), /readyz (can take webhooks), /metrics.

They need no Frotcom token. With ``[metrics] port`` unset they are routes of the webhook
listener; with it set they are served only by a listener of their own, started from
``create_app``'s cleanup context, so the webhook's public address does not expose them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay.cli import EXIT_RUNTIME, CliError
from relay.metrics import OUTBOX_READ_ERRORS, OutboxSnapshot, read_outbox
from relay.outbox.storage import LowDiskSpace
from relay.state import OUTBOX, STATE, RelayState

log = structlog.get_logger("relay.health")

# /readyz answers within this even when the outbox is locked (its busy timeout is 5 s);
# a check still running then is reported as the reason, and reused by the next probe.
READY_TIMEOUT_SECONDS = 2.0
# A scrape still reading the outbox after this is answered without the outbox gauges.
SCRAPE_READ_TIMEOUT_SECONDS = 5.0
# Monitoring requests are short; a slow scraper must not hold up the relay's stop.
LISTENER_SHUTDOWN_SECONDS = 1.0


def forwarder_running(state: RelayState) -> bool:
    task = state.forwarder_task
    return state.forwarder is not None and task is not None and not task.done()


def forwarder_word(state: RelayState) -> str:
    if state.forwarder is not None and state.forwarder.pause is not None:
        return "paused"
    return "running" if forwarder_running(state) else "stopped"


def stopping(state: RelayState) -> bool:
    # The app's stop (on_shutdown), not the forwarder's flag: a crashed forwarder also
    # ends up "stopping", and that is "forwarder not running".
    return state.stopping_since is not None


class _WriteCheck:
    """At most one ``check_writable`` in flight, however many probes ask meanwhile.

    Never cancelled: cancelling an aiosqlite call can leave its BEGIN running in the
    worker thread after the outbox lock was released.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def problem(self, app: web.Application) -> str | None:
        if OUTBOX not in app:
            return "outbox not open"
        outbox = app[OUTBOX]
        try:
            outbox.check_free_space()
        except LowDiskSpace as exc:
            return f"outbox low on disk space: {exc.strerror}"
        except OSError as exc:
            return f"outbox not writable: {exc}"
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(outbox.check_writable(), name="readyz-write-check")
            # Retrieved here so a check nobody waits for any more is not reported as lost.
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        done, _ = await asyncio.wait({self._task}, timeout=READY_TIMEOUT_SECONDS)
        if not done:
            return f"outbox not writable: no answer within {READY_TIMEOUT_SECONDS:g}s (locked?)"
        exc = self._task.exception()
        if exc is not None:
            return f"outbox not writable: {type(exc).__name__}: {exc}"
        return None


# What probe_routes serves; the webhook's 404 names the listener that has them.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def probe_routes(app: web.Application) -> list[web.RouteDef]:
    """/healthz, /readyz and /metrics for the relay ``app`` (on whichever listener)."""
    write_check = _WriteCheck()

    async def healthz(request: web.Request) -> web.Response:
        # Alive: the process answers and its forwarder task has not died. A dead
        # forwarder also ends `serve` (exit 1); this says so to whoever asks first.
        state = app[STATE]
        running = forwarder_running(state)
        body = {"status": "ok" if running else "degraded", "forwarder": forwarder_word(state)}
        return web.json_response(body, status=200 if running else 503)

    async def readyz(request: web.Request) -> web.Response:
        # Ready: a webhook posted now would be stored, and stored rows would be sent.
        state = app[STATE]
        reasons: list[str] = []
        if stopping(state):
            reasons.append("stopping")  # the outbox is closing: nothing more to check
        else:
            if not forwarder_running(state):
                reasons.append("forwarder not running")
            problem = await write_check.problem(app)
            if problem is not None:
                reasons.append(problem)
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready", "forwarder": forwarder_word(state)})

    async def metrics(request: web.Request) -> web.Response:
        state = app[STATE]
        state.metrics.outbox = await _read_outbox(state)
        return web.Response(
            body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return [
        web.get("/healthz", healthz, allow_head=False),
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics, allow_head=False),
    ]


async def _read_outbox(state: RelayState) -> OutboxSnapshot | None:
    now_ms = int(state.clock() * 1000)
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(read_outbox, state.config.outbox.path, now_ms),
            SCRAPE_READ_TIMEOUT_SECONDS,
        )
    except (TimeoutError, *OUTBOX_READ_ERRORS) as exc:
        log.warning("metrics_outbox_unreadable", error=f"{type(exc).__name__}: {exc}")
        return None


async def probe_listener(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the probes on ``[metrics] host:port``, for the app's whole life.

    First in the chain, so it unwinds last: during a stop /readyz says "stopping" until
    the outbox is closed.
    """
    config = app[STATE].config.metrics
    assert config.port is not None
    probes = web.Application()
    probes.add_routes(probe_routes(app))
    runner = web.AppRunner(
        probes, handle_signals=False, access_log=None, shutdown_timeout=LISTENER_SHUTDOWN_SECONDS
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise CliError(
                f"cannot listen on {config.host}:{config.port} ([metrics]): {reason}",
                EXIT_RUNTIME,
            ) from None
        port = int(runner.addresses[0][1])
        app[STATE].metrics_port = port
        log.info("metrics_listening", host=config.host, port=port)
        yield
    finally:
        await runner.cleanup()
