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
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from relay import __version__
from relay.admin import AdminError, FilterError, parse_time
from relay.config import Config, ConfigError, load_config
from relay.logging import LEVELS, configure_logging
from relay.outbox.schema import OutboxError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_OUTBOX = 3
EXIT_PIPE = 141  # what a shell reports for a process killed by SIGPIPE
DEFAULT_CONFIG = os.environ.get("CARTRACK_RELAY_CONFIG", "config.toml")


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: the user sees what is wrong at a glance.
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def _iso_time(text: str) -> str:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(lo: float, *, strict: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lo or (strict and value == lo):
            bound = f"> {lo:g}" if strict else f">= {lo:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {bound}")
        return value

    return parse


def _count(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {lo} to {hi}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cartrack-relay",
        description="Durable store-and-forward relay: Frotcom position webhooks to Cartrack.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help="TOML configuration file (default: $CARTRACK_RELAY_CONFIG or ./config.toml)",
    )
    common.add_argument("--log-level", default="info", choices=LEVELS)
    common.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="auto: JSON lines unless stdout is a terminal",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    sub.add_parser("serve", parents=[common], help="run the relay in the foreground")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")

    p = sub.add_parser(
        "status",
        parents=[common],
        help="what is in the outbox",
        description="Rows by status, the oldest pending position, the vehicles with the"
        " largest backlog, held vehicles, dead letters by Cartrack status, the newest"
        " errors and what the daemon recorded. Safe while the daemon runs.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--top",
        type=_count(1, 10_000),
        default=10,
        metavar="N",
        help="vehicles and errors listed per table (default 10)",
    )

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="where is my position? one vehicle's rows, or one event",
        description="The positions of one vehicle, in time order, with their status,"
        " attempts, next attempt, Cartrack's last answer and sent time, plus the"
        " vehicle's quarantined input; or one event by its provider_event_id. With"
        " --from, the first N from that time; else the newest N. Safe while the daemon"
        " runs.",
    )
    p.add_argument("vehicle", nargs="?", metavar="VEHICLE_ID", help="Frotcom VehicleID")
    p.add_argument(
        "--event-id",
        metavar="ID",
        help="the provider_event_id sent to Cartrack, e.g. frotcom:9876543:2024-05-01T08:00:00.000Z",
    )
    p.add_argument(
        "--from",
        dest="since",
        type=_iso_time,
        metavar="TIME",
        help="only positions at or after this ISO-8601 time (UTC unless it has an offset)",
    )
    p.add_argument(
        "--to", dest="until", type=_iso_time, metavar="TIME", help="only positions before this time"
    )
    p.add_argument(
        "--limit",
        type=_count(1, 100_000),
        default=50,
        metavar="N",
        help="at most N positions: the first N from --from, else the newest (default 50)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "requeue",
        parents=[common],
        help="send failed rows again",
        description="Put failed (or sent) rows back in the queue. Rows of vehicles without"
        " a VIN in [vehicles] become 'held'. A running daemon picks the rows up within"
        " seconds; the command is safe to run while it does.",
    )
    p.add_argument(
        "--vehicle",
        action="append",
        default=[],
        metavar="ID",
        help="only this VehicleID (repeatable)",
    )
    p.add_argument(
        "--since",
        type=_iso_time,
        metavar="TIME",
        help="only positions at or after this ISO-8601 time (UTC unless it has an offset)",
    )
    p.add_argument(
        "--until", type=_iso_time, metavar="TIME", help="only positions before this ISO-8601 time"
    )
    p.add_argument(
        "--status",
        default="failed",
        choices=("failed", "sent"),
        help="rows to requeue (default failed; 'sent' re-sends delivered rows)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")

    p = sub.add_parser(
        "purge",
        parents=[common],
        help="delete old sent rows and quarantine",
        description="Delete sent rows (and with --quarantine, quarantine rows) older than"
        " DAYS, in small transactions so a running daemon is not blocked. Pending, held"
        " and failed rows are never deleted.",
    )
    p.add_argument(
        "--older-than-days",
        type=_number(0),
        metavar="DAYS",
        help="age of sent rows to delete; 0 = all sent rows (default outbox.keep_sent_days)",
    )
    p.add_argument("--quarantine", action="store_true", help="also delete quarantine rows that old")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")

    p = sub.add_parser(
        "demo", parents=[common], help="relay + Cartrack stand-in + Frotcom simulator, locally"
    )
    p.add_argument(
        "--duration",
        type=_number(0, strict=True),
        default=None,
        metavar="S",
        help="stop after S seconds (default: Ctrl-C)",
    )
    p.add_argument(
        "--vehicles",
        type=_count(1, 100_000),
        default=5,
        metavar="N",
        help="simulated fleet size (default 5)",
    )
    p.add_argument(
        "--interval",
        type=_number(0, strict=True),
        default=3.0,
        metavar="S",
        help="seconds between Frotcom batches",
    )
    p.add_argument(
        "--dir", default="demo", metavar="DIR", help="where the demo outbox lives (default ./demo)"
    )

    p = sub.add_parser(
        "fake-cartrack", parents=[common], help="a local Cartrack stand-in that validates events"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_count(0, 65535), default=9000)
    p.add_argument("--api-key", default=None, help="accept only this X-API-KEY (default: any)")

    p = sub.add_parser("simulate", parents=[common], help="post Frotcom-style batches to a relay")
    p.add_argument("--url", required=True, help="the relay's webhook URL")
    p.add_argument("--token", required=True, help="Authorization token to send")
    p.add_argument("--vehicles", type=_count(1, 100_000), default=10, metavar="N")
    p.add_argument(
        "--interval",
        type=_number(0, strict=True),
        default=60.0,
        metavar="S",
        help="seconds between batches",
    )
    p.add_argument("--duration", type=_number(0, strict=True), default=None, metavar="S")
    p.add_argument("--seed", type=int, default=0)
    return parser


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
    from relay.serve import serve

    config = _config(args)
    return asyncio.run(serve(config))


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
