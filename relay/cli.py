"""The ``cartrack-relay`` command line.

Every failure a user can cause ends in one line on stderr and a non-zero status,
never a traceback:  2 = configuration or usage error, 3 = the outbox file cannot be
used, 1 = anything else that went wrong at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from relay import __version__
from relay.config import Config, ConfigError, load_config
from relay.logging import LEVELS, configure_logging
from relay.outbox.schema import OutboxError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_OUTBOX = 3
DEFAULT_CONFIG = os.environ.get("CARTRACK_RELAY_CONFIG", "config.toml")


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


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

    p = sub.add_parser("status", parents=[common], help="what is in the outbox")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("requeue", parents=[common], help="send failed rows again")
    p.add_argument(
        "--vehicle",
        action="append",
        default=[],
        metavar="ID",
        help="only this VehicleID (repeatable)",
    )
    p.add_argument("--since", metavar="TIME", help="only positions at or after this ISO-8601 time")
    p.add_argument("--until", metavar="TIME", help="only positions before this ISO-8601 time")
    p.add_argument(
        "--status",
        default="failed",
        choices=("failed", "sent"),
        help="rows to requeue (default failed; 'sent' re-sends delivered rows)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")

    p = sub.add_parser("purge", parents=[common], help="delete old sent rows and quarantine")
    p.add_argument(
        "--older-than-days",
        type=float,
        metavar="DAYS",
        help="age of sent rows to delete (default outbox.keep_sent_days)",
    )
    p.add_argument("--quarantine", action="store_true", help="also delete quarantine rows that old")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")

    p = sub.add_parser(
        "demo", parents=[common], help="relay + Cartrack stand-in + Frotcom simulator, locally"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: Ctrl-C)",
    )
    p.add_argument(
        "--vehicles", type=int, default=5, metavar="N", help="simulated fleet size (default 5)"
    )
    p.add_argument(
        "--interval", type=float, default=3.0, metavar="S", help="seconds between Frotcom batches"
    )
    p.add_argument(
        "--dir", default="demo", metavar="DIR", help="where the demo outbox lives (default ./demo)"
    )

    p = sub.add_parser(
        "fake-cartrack", parents=[common], help="a local Cartrack stand-in that validates events"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--api-key", default=None, help="accept only this X-API-KEY (default: any)")

    p = sub.add_parser("simulate", parents=[common], help="post Frotcom-style batches to a relay")
    p.add_argument("--url", required=True, help="the relay's webhook URL")
    p.add_argument("--token", required=True, help="Authorization token to send")
    p.add_argument("--vehicles", type=int, default=10, metavar="N")
    p.add_argument(
        "--interval", type=float, default=60.0, metavar="S", help="seconds between batches"
    )
    p.add_argument("--duration", type=float, default=None, metavar="S")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OutboxError as exc:
        print(f"outbox error: {exc}", file=sys.stderr)
        return EXIT_OUTBOX
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.serve import serve

    config = _config(args)
    return asyncio.run(serve(config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"config ok: {config.source}")
    print(json.dumps(config.redacted(), indent=2, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from relay.admin import render_status, status

    report = status(_config(args))
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from relay.admin import requeue

    count = requeue(
        _config(args),
        vehicles=args.vehicle,
        since=args.since,
        until=args.until,
        status=args.status,
        dry_run=args.dry_run,
    )
    verb = "would requeue" if args.dry_run else "requeued"
    print(f"{verb} {count} {args.status} row{'s' if count != 1 else ''}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from relay.admin import purge

    config = _config(args)
    days = config.outbox.keep_sent_days if args.older_than_days is None else args.older_than_days
    if days < 0:
        raise CliError("--older-than-days must be >= 0", EXIT_CONFIG)
    result = purge(config, days, quarantine=args.quarantine, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {result['sent']} sent rows and {result['quarantine']} quarantine rows older than {days:g} days"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.devtools.demo import run_demo

    if args.vehicles < 1:
        raise CliError("--vehicles must be >= 1", EXIT_CONFIG)
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

    return _run_until_signal(
        lambda stop: run_fake_cartrack(args.host, args.port, args.api_key, stop)
    )


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
    "requeue": cmd_requeue,
    "purge": cmd_purge,
    "demo": cmd_demo,
    "fake-cartrack": cmd_fake_cartrack,
    "simulate": cmd_simulate,
}
