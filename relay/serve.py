"""``cartrack-relay serve``: run the app in the foreground until a signal says stop.

SIGTERM/SIGINT stop accepting, let in-flight webhook requests and deliveries finish
within ``server.shutdown_timeout_seconds`` and exit 0. SIGHUP re-reads the vehicle
map. A background task that dies ends the process with status 1, so systemd restarts it.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from relay.app import create_app, reload_vehicles
from relay.config import Config, ConfigError, load_config
from relay.sdnotify import notify
from relay.state import STATE

log = structlog.get_logger("relay.serve")

EXIT_OK = 0
EXIT_CRASH = 1


async def serve(config: Config) -> int:
    app = create_app(config)
    app.on_shutdown.append(_stop_forwarder)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.server.shutdown_timeout_seconds,
    )
    await runner.setup()  # opens and migrates the outbox, starts the forwarder
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    def request_stop(signame: str) -> None:
        log.info("signal_received", signal=signame)
        stop.set()

    def request_reload() -> None:
        task = asyncio.create_task(_reload(app), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, request_reload)
    exit_code = EXIT_OK
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        log.info(
            "relay_started",
            listen=[f"{h}:{p}" for h, p, *_ in runner.addresses],
            path=config.server.path,
            outbox=str(config.outbox.path),
            cartrack=config.cartrack.url,
            vehicles=len(config.vehicles),
        )
        notify("READY=1\nSTATUS=accepting webhooks")
        fatal = app[STATE].fatal
        assert fatal is not None
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, fatal}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if fatal.done():
            log.critical("relay_failed", error=repr(fatal.result()))
            exit_code = EXIT_CRASH
    finally:
        notify("STOPPING=1")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        log.info("relay_stopping", timeout=config.server.shutdown_timeout_seconds)
        await runner.cleanup()
        log.info("relay_stopped", exit_code=exit_code)
    return exit_code


async def _stop_forwarder(app: web.Application) -> None:
    # Runs once the listener is closed, while in-flight requests are still finishing:
    # lanes stop at their next wait instead of after the HTTP drain.
    forwarder = app[STATE].forwarder
    if forwarder is not None:
        await forwarder.stop()


async def _reload(app: web.Application) -> None:
    source = app[STATE].config.source
    if source is None:
        log.warning("reload_skipped", reason="configuration has no file")
        return
    try:
        config = await asyncio.to_thread(load_config, source)
    except ConfigError as exc:
        # A typo in the new file must not take the running relay down.
        log.error("reload_failed", key=exc.key, error=exc.message)
        return
    await reload_vehicles(app, config.vehicles)
