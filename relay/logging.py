"""structlog, configured once: JSON lines off a terminal (journald), console on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(
    level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    stream = sys.stdout if stream is None else stream
    if json is None:
        json = not stream.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: tests swap the configuration with structlog.testing.capture_logs().
        cache_logger_on_first_use=False,
    )
    # aiohttp's access log and warnings go through the stdlib; keep them quiet and
    # on the same stream rather than interleaving raw text with JSON lines.
    logging.basicConfig(
        level=logging.WARNING, stream=stream, format="%(name)s %(levelname)s %(message)s"
    )
