"""``cartrack-relay serve``: run the app in the foreground until a signal says stop.

SIGTERM/SIGINT stop accepting, let in-flight webhook requests and deliveries finish
within ``server.shutdown_timeout_seconds`` and exit 0. SIGHUP re-reads the vehicle
map. A background task that dies ends the process with status 1, so systemd restarts it.
With ``server.tls_cert_file``/``tls_key_file`` the webhook is served over HTTPS; a pair
that does not load is a configuration error (exit 2) before the outbox is touched.
Under systemd's ``WatchdogSec=`` a task on the event loop pings ``WATCHDOG=1``.

Shutdown order (aiohttp's ``runner.cleanup`` plus the hooks below):

1. the listening socket closes: nothing new is accepted;
2. ``on_shutdown`` (in ``create_app``): the forwarder is told to stop, and its deadline
   starts;
3. in-flight webhook requests finish (or are cancelled at the deadline, unanswered);
4. ``cleanup_ctx`` unwinds: the forwarder task ends (its last acks are flushed), then
   the outbox closes.

Steps 2 and 3 overlap, so the whole stop takes about one timeout, not two.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web
from yarl import URL

from relay import frotcom
from relay.app import create_app, reload_vehicles
from relay.cli import EXIT_RUNTIME, CliError
from relay.config import Config, ConfigError, ServerConfig, load_config
from relay.heap import tune_malloc
from relay.logging import register_secrets
from relay.outbox import connection
from relay.sdnotify import notify, reloading_message, watchdog, watchdog_interval
from relay.state import STATE

log = structlog.get_logger("relay.serve")

EXIT_OK = 0
EXIT_CRASH = 1
SWITCH_INTERVAL = 0.00005  # seconds; see run()
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections; see serve()
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ListenError(CliError):
    """The configured address cannot be listened on (in use, not ours, not allowed).

    Exit status 1, not 2: a port still held by a process on its way out is gone a few
    seconds later, and systemd's restart should get that chance.
    """

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        # asyncio's strerror repeats the address at length; the errno's text is enough.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"cannot listen on {host}:{port}: {reason}", EXIT_RUNTIME)


def run(config: Config) -> int:
    """``serve`` on the event loop that ``server.event_loop`` names."""
    # The outbox's writer thread gives up the GIL for every SQLite statement and must
    # win it back from the busy event loop; with Python's default 5 ms interval each
    # handoff can cost that much. bench.ingest's load at 8 / 32 senders, 21:00, A/B
    # alternating: 0.5 ms 30-32k / 31-35k positions/s; 50 us 36-44k / 40-47k with a
    # lower ack p99; 20 us about the same as 50. Forwarding: no difference measured.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Before the loop allocates its first socket buffer (relay/heap.py).
    not_tuned = tune_malloc()
    if not_tuned is not None:
        log.info("malloc_defaults_kept", reason=not_tuned)
    with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
        return runner.run(serve(config))


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None  # asyncio's own


async def serve(config: Config) -> int:
    register_secrets([config.cartrack.api_key, *config.frotcom.tokens])
    ssl_context = tls_context(config.server)
    timeout = config.server.shutdown_timeout_seconds
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=timeout)
    signals = _Signals(app)
    # Installed before the outbox opens and kept until it is closed: a signal in between
    # would otherwise take its default action (SIGHUP, a second SIGTERM: instant death).
    signals.install()
    pinger = _start_watchdog()
    try:
        try:
            await runner.setup()  # opens and migrates the outbox, starts the forwarder
        except BaseException:
            await runner.cleanup()  # unwinds whatever did start (the outbox, if open)
            raise
        tune_gc()
        exit_code = EXIT_CRASH
        try:
            exit_code = await _run(config, app, runner, signals, ssl_context)
        finally:
            notify("STOPPING=1")
            log.info("relay_stopping", timeout=timeout)
            await signals.finish_reloads(timeout)
            await runner.cleanup()
            log.info("relay_stopped", exit_code=exit_code)
        return exit_code
    finally:
        signals.remove()
        if pinger is not None:
            # Pinged until the outbox is closed: a slow but live shutdown (the last acks,
            # the WAL checkpoint) is not a hang.
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections for a process that allocates rows all day.

    Every webhook request makes a few hundred tuples and lists (its rows), so with
    Python's default threshold of 700 allocations a young collection ran every two or
    three requests, with the GIL held; and every full collection walked everything
    loaded at startup (aiohttp, the app). Nearly all of those are garbage by refcount
    alone. Freezing what exists once started keeps it out of every later collection,
    and a higher young threshold makes collections rarer, not longer-lived objects
    uncollected: cycles are still found, only later.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _start_watchdog() -> asyncio.Task[None] | None:
    interval = watchdog_interval()
    if interval is None:
        return None
    log.info("watchdog_enabled", interval_seconds=interval)
    return asyncio.create_task(watchdog(interval), name="watchdog")


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS context for the webhook listener, or None for plain HTTP.

    Loaded before anything else starts, so a bad pair is one ``config error`` line
    naming the key at fault, not a traceback after the outbox has been opened.
    """
    cert, key = server.tls_cert_file, server.tls_key_file
    if cert is None or key is None:
        return None  # config.py guarantees both or neither
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # Checked on its own first: load_cert_chain's errors do not say which file is bad.
        ssl.create_default_context(cafile=str(cert))
    except ssl.SSLError:
        raise ConfigError("server.tls_cert_file", f"{cert} holds no PEM certificate") from None
    except (OSError, ValueError) as exc:
        raise ConfigError("server.tls_cert_file", f"cannot read {cert}: {_reason(exc)}") from None
    try:
        # The password callback stops OpenSSL from prompting on a terminal for an
        # encrypted key, which would hang a service; such a key fails here instead.
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{key} is not the private key of the certificate in {cert}"
        else:
            message = f"{key} holds no unencrypted PEM private key"
        raise ConfigError("server.tls_key_file", message) from None
    except (OSError, ValueError) as exc:
        raise ConfigError("server.tls_key_file", f"cannot read {key}: {_reason(exc)}") from None
    return context


def _no_password() -> bytes:
    return b""


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


async def _run(
    config: Config,
    app: web.Application,
    runner: web.AppRunner,
    signals: _Signals,
    ssl_context: ssl.SSLContext | None,
) -> int:
    """Listen, announce readiness, and wait for a stop signal or a dead background task."""
    fatal = app[STATE].fatal
    assert fatal is not None  # set by create_app's outbox context during setup
    if not signals.stop.is_set() and not fatal.done():
        site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            log.error(
                "listen_failed", host=config.server.host, port=config.server.port, error=str(exc)
            )
            raise ListenError(config.server.host, config.server.port, exc) from None
        log.info(
            "relay_started",
            listen=[f"{h}:{p}" for h, p, *_ in runner.addresses],
            path=config.server.path,
            tls=ssl_context is not None,
            outbox=str(config.outbox.path),
            cartrack=_safe_url(config.cartrack.url),
            vehicles=len(config.vehicles),
            # "python": relay/_rows.c was not built (no C compiler at install); the same
            # rows, at about a tenth more CPU per position (bench/README.md, sixth pass).
            hot_path=frotcom.hot_path(),
            # "compiled": the writer's WAL and statements through relay/_sqlrun.c; else
            # why not, and the writer runs on the sqlite3 module alone (eighth pass).
            outbox_writer=connection.native(),
        )
        notify("READY=1\nSTATUS=accepting webhooks")
        signals.started.set()
        waiter = asyncio.ensure_future(signals.stop.wait())
        try:
            await asyncio.wait({waiter, fatal}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
    if fatal.done():
        log.critical("relay_failed", error=repr(fatal.result()))
        return EXIT_CRASH
    return EXIT_OK


class _Signals:
    """SIGTERM/SIGINT request a stop; SIGHUP reloads the vehicle map, one reload at a time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()
        # FIFO: two quick SIGHUPs apply the file in the order the signals came.
        self._reload_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        self._loop.add_signal_handler(signal.SIGINT, self._request_stop, "SIGINT")
        self._loop.add_signal_handler(signal.SIGHUP, self._request_reload)

    def remove(self) -> None:
        for signum in SIGNALS:
            self._loop.remove_signal_handler(signum)

    def _request_stop(self, signame: str) -> None:
        if self.stop.is_set():
            # The stop is already bounded by shutdown_timeout_seconds; a second signal
            # must not cut the final acknowledgements and the outbox close short.
            log.info("signal_ignored", signal=signame, reason="already stopping")
            return
        log.info("signal_received", signal=signame)
        self.stop.set()

    def _request_reload(self) -> None:
        if self.stop.is_set():
            log.info("signal_ignored", signal="SIGHUP", reason="stopping")
            return
        log.info("signal_received", signal="SIGHUP")
        self._spawn(self._reload())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def finish_reloads(self, timeout: float) -> None:
        # A reload still releasing held rows must not find the outbox closed under it.
        if not self._reloads:
            return
        pending = set(self._reloads)
        if self.started.is_set():
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _reload(self) -> None:
        async with self._reload_lock:
            # A SIGHUP while the outbox is still opening applies once the relay serves.
            await self.started.wait()
            notify(reloading_message())
            try:
                await _reload(self.app)
            finally:
                notify("READY=1\nSTATUS=accepting webhooks")


async def _reload(app: web.Application) -> None:
    state = app[STATE]
    source = state.config.source
    if source is None:
        log.warning("reload_skipped", reason="configuration has no file")
        return
    try:
        config = await asyncio.to_thread(load_config, source)
    except ConfigError as exc:
        # A typo in the new file must not take the running relay down.
        log.error("reload_failed", key=exc.key, error=exc.message)
        return
    restart_needed = [
        name
        for name in ("server", "frotcom", "cartrack", "outbox", "retry")
        if getattr(config, name) != getattr(state.config, name)
    ]
    if restart_needed:
        log.warning(
            "reload_partial",
            reason="SIGHUP reloads [vehicles] only; restart to apply the rest",
            changed=restart_needed,
        )
    try:
        await reload_vehicles(app, config.vehicles)
    except Exception as exc:
        # The new map may be half applied (in memory, not yet in the outbox): held rows
        # stay held until the next SIGHUP or restart releases them. Not worth dying for.
        log.error("reload_failed", key="vehicles", error=f"{type(exc).__name__}: {exc}")


def _safe_url(url: str) -> str:
    """The URL without credentials or query, which may carry a key."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_query(None).with_fragment(None))
