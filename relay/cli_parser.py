"""The ``cartrack-relay`` argument parser: every command, option and value check.

Usage errors are one line on stderr and status 2, never argparse's usage block.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, NoReturn

from relay import __version__
from relay.admin import parse_time
from relay.exits import EXIT_CONFIG
from relay.logging import LEVELS

DEFAULT_CONFIG = os.environ.get("CARTRACK_RELAY_CONFIG", "config.toml")


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
