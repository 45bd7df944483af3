"""The ``cartrack-relay`` command line.

Every failure a user can cause ends in one line on stderr and a non-zero status,
never a traceback:  2 = configuration or usage error, 3 = the outbox file cannot be
used, 1 = anything else that went wrong at run time (e.g. the outbox stayed locked),
141 = the reader of our output went away (``status | head``), like a SIGPIPE death.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from relay.admin import AdminError, FilterError
from relay.cli_parser import build_parser
from relay.config import Config, ConfigError, load_config
from relay.exits import EXIT_CONFIG, EXIT_OUTBOX, EXIT_PIPE, EXIT_RUNTIME, CliError
from relay.logging import configure_logging
from relay.outbox.schema import OutboxError

__all__ = ["EXIT_CONFIG", "EXIT_OUTBOX", "EXIT_PIPE", "EXIT_RUNTIME", "CliError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    try:
        code = COMMANDS[args.command](args)
        # Flushed here, not at interpreter exit, so a closed pipe is handled below.
        sys.stdout.flush()
        return code
    except (ConfigError, OutboxError, FilterError, AdminError, CliError) as exc:
        prefix, code = _failure(exc)
        print(f"{prefix}: {exc}", file=sys.stderr)
        return code
    except BrokenPipeError:
        # `cartrack-relay status | head`: the reader left; say nothing more.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_PIPE
    except KeyboardInterrupt:
        return 130


def _failure(exc: Exception) -> tuple[str, int]:
    """The stderr prefix and exit status for an error the user can act on."""
    if isinstance(exc, ConfigError):
        return "config error", EXIT_CONFIG
    if isinstance(exc, OutboxError):
        return "outbox error", EXIT_OUTBOX
    if isinstance(exc, FilterError):
        return "error", EXIT_CONFIG
    if isinstance(exc, CliError):
        return "error", exc.code
    return "error", EXIT_RUNTIME


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def _admin_config(args: argparse.Namespace) -> Config:
    # Reading and editing the outbox needs no Cartrack key; under systemd the key is a
    # credential that only the service can read.
    return load_config(Path(args.config), require_api_key=False)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.serve import run

    return run(_config(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.serve import tls_context

    config = _config(args)
    tls_context(config.server)  # a bad certificate/key pair is caught here, not at start
    print(f"config ok: {config.source}")
    print(json.dumps(config.redacted(), indent=2, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from relay.admin import render_status, status

    report = status(_admin_config(args), top=args.top)
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from relay.admin import inspect_event, inspect_vehicle, render_inspect

    if (args.vehicle is None) == (args.event_id is None):
        raise CliError("give either VEHICLE_ID or --event-id", EXIT_CONFIG)
    if args.event_id is not None:
        if args.since is not None or args.until is not None:
            raise CliError("--from and --to go with VEHICLE_ID, not --event-id", EXIT_CONFIG)
        report = inspect_event(_admin_config(args), args.event_id)
    else:
        _check_window(args.since, args.until, "--from", "--to")
        report = inspect_vehicle(
            _admin_config(args), args.vehicle, since=args.since, until=args.until, limit=args.limit
        )
    print(json.dumps(report, indent=2) if args.json else render_inspect(report))
    return 0


def _check_window(since: str | None, until: str | None, lo: str, hi: str) -> None:
    # Both are normalised by _iso_time, so text order is time order.
    if since is not None and until is not None and since >= until:
        raise CliError(f"{lo} ({since}) must be before {hi} ({until})", EXIT_CONFIG)


def cmd_requeue(args: argparse.Namespace) -> int:
    from relay.admin import requeue
    from relay.forwarder import RESCAN_SECONDS

    _check_window(args.since, args.until, "--since", "--until")
    result = requeue(
        _admin_config(args),
        vehicles=args.vehicle,
        since=args.since,
        until=args.until,
        status=args.status,
        dry_run=args.dry_run,
    )
    count = result.total
    verb = "would requeue" if args.dry_run else "requeued"
    line = f"{verb} {_rows(count, args.status)}"
    if result.held:
        held = ", ".join(result.held_vehicles[:10])
        more = (
            f" and {len(result.held_vehicles) - 10} more" if len(result.held_vehicles) > 10 else ""
        )
        line += (
            f" ({result.pending} to pending, {result.held} to held: no VIN in [vehicles]"
            f" for {held}{more})"
        )
    print(line)
    if count and not args.dry_run:
        print(f"a running daemon picks them up within {RESCAN_SECONDS:g} s")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from relay.admin import purge

    config = _admin_config(args)
    days = config.outbox.keep_sent_days if args.older_than_days is None else args.older_than_days
    result = purge(config, days, quarantine=args.quarantine, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    age = "of any age" if days == 0 else f"older than {days:g} days"
    what = _rows(result["sent"], "sent")
    if args.quarantine:
        what += f" and {_rows(result['quarantine'], 'quarantine')}"
    print(f"{verb} {what} {age}")
    return 0


def _rows(count: int, kind: str) -> str:
    return f"{count} {kind} row{'' if count == 1 else 's'}"


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.devtools.demo import run_demo

    return asyncio.run(
        run_demo(
            directory=Path(args.dir),
            vehicles=args.vehicles,
            duration=args.duration,
            interval=args.interval,
        )
    )


def cmd_fake_cartrack(args: argparse.Namespace) -> int:
    from relay.devtools.fake_cartrack import run_fake_cartrack

    try:
        return _run_until_signal(
            lambda stop: run_fake_cartrack(args.host, args.port, args.api_key, stop)
        )
    except OSError as exc:  # port taken, address not local
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from relay.devtools.simulator import simulate

    async def run(stop: asyncio.Event) -> None:
        stats = await simulate(
            args.url,
            args.token,
            args.vehicles,
            args.interval,
            duration=args.duration,
            stop=stop,
            seed=args.seed,
        )
        print(
            json.dumps(
                {
                    "batches": stats.batches,
                    "positions": stats.positions,
                    "ok": stats.ok,
                    "failed": stats.failed,
                }
            )
        )

    return _run_until_signal(run)


def _run_until_signal(factory: object) -> int:
    import signal

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await factory(stop)  # type: ignore[operator]
        return 0

    return asyncio.run(runner())


COMMANDS = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "status": cmd_status,
    "inspect": cmd_inspect,
    "requeue": cmd_requeue,
    "purge": cmd_purge,
    "demo": cmd_demo,
    "fake-cartrack": cmd_fake_cartrack,
    "simulate": cmd_simulate,
}
