"""structlog, configured once: JSON lines off a terminal (journald), console on one.

Records from the standard library (aiohttp's "Error handling request", asyncio's "Task
exception was never retrieved") go through the same renderer, so a JSON log stays one
JSON object per line. Every line passes a scrubber that masks the registered secrets
(the Cartrack API key, the Frotcom tokens): SPEC §4 says never a secret in a log line,
and a library error message that echoes a header must not break that promise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")
MASK = "[REDACTED]"
# Values of these keys are masked whatever they hold; a string under another key is
# scrubbed of registered secrets only.
SECRET_KEYS = frozenset({"api_key", "x-api-key", "authorization", "token", "password", "secret"})
# Shorter "secrets" would mask ordinary words and numbers all over the log.
MIN_SECRET_LENGTH = 6

_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values wherever they would appear in a log line from now on."""
    _secrets.update(v for v in values if len(v) >= MIN_SECRET_LENGTH)


def forget_secrets() -> None:
    _secrets.clear()


def scrub_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-named keys and registered secret values."""
    return {
        key: MASK if isinstance(value, str) and key.lower() in SECRET_KEYS else _scrub(value)
        for key, value in event_dict.items()
    }


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


class _RelayHandler(logging.StreamHandler[TextIO]):
    """The root handler configure_logging installs; a second call replaces it."""


def configure_logging(
    level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    stream = sys.stdout if stream is None else stream
    if json is None:
        json = not stream.isatty()
    numeric = getattr(logging, level.upper())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # JSON lines carry tracebacks as an "exception" string (which the scrubber sees); the
    # console renderer formats exc_info itself.
    exc_info: Processor = (
        structlog.processors.format_exc_info if json else structlog.dev.set_exc_info
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            exc_info,
            scrub_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: tests swap the configuration with structlog.testing.capture_logs().
        cache_logger_on_first_use=False,
    )
    handler = _RelayHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                # A library's line inside a webhook request carries its request_id too.
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if json else _keep,
                scrub_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries stay quiet below WARNING: aiohttp's info chatter is not ours to show.
    root.setLevel(max(numeric, logging.WARNING))


def _keep(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    return event_dict
