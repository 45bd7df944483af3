"""Cartrack Telematics Data Ingestion client: one POST per event, and the retry maths.

Nothing here touches the outbox. The client turns every possible result of a
request (a response, a timeout, a broken connection) into an ``Outcome`` whose
``Verdict`` tells the forwarder what to do with the row, so the forwarder never
has to know about HTTP status codes or connection errors.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

import structlog

from relay import __version__
from relay.http1 import Http1Client, Response

__all__ = [
    "DETAIL_LIMIT",
    "RETRY_AFTER_CAP",
    "CartrackClient",
    "Outcome",
    "Verdict",
    "backoff_delay",
    "classify",
    "parse_retry_after",
    "retry_delay",
]

# Response bodies end up in the outbox (dead-letter detail) and in logs; an
# HTML error page from a proxy must not bloat either.
DETAIL_LIMIT = 1024
# SPEC: Retry-After overrides retry.max_seconds but is bounded at one hour, so a
# misbehaving server cannot park the whole relay for days.
RETRY_AFTER_CAP = 3600.0

# Beyond 2**64 the delay is always capped by `maximum` anyway; stopping here
# keeps `2.0 ** n` from raising OverflowError for absurd attempt counts.
_MAX_EXPONENT = 64
# UTF-8 needs at most 4 bytes per character, so this many bytes always decode
# to at least DETAIL_LIMIT characters.
_READ_LIMIT = DETAIL_LIMIT * 4
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_REDACTED = "[REDACTED]"

log = structlog.get_logger(__name__)


class Verdict(enum.StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    REJECTED = "rejected"
    AUTH = "auth"


def classify(status: int) -> Verdict:
    """Map an HTTP status to what the forwarder does with the row (SPEC §2 table)."""
    if 200 <= status <= 299 or status == 409:
        # 409: Cartrack already holds this provider_event_id, i.e. an earlier
        # attempt got through and only its response was lost.
        return Verdict.SENT
    if status in (401, 403):
        return Verdict.AUTH
    if status in (408, 425, 429):
        return Verdict.TRANSIENT
    if 400 <= status <= 499:
        return Verdict.REJECTED
    # 3xx (we never follow redirects), 5xx, and anything outside the defined
    # ranges: none of these says the event itself is bad, so dead-lettering
    # would lose data; retrying is the only safe choice.
    return Verdict.TRANSIENT


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    status: int | None
    detail: str
    retry_after: float | None
    elapsed: float
    # Why there is no status: "timeout" or "connection_error" (None when answered).
    failure: str | None = None

    @property
    def label(self) -> str:
        """The status as a metric label and log field: "503", "timeout", "connection_error"."""
        if self.status is not None:
            return str(self.status)
        return self.failure or "no_response"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait according to a Retry-After header, clamped to [0, RETRY_AFTER_CAP].

    ``now`` is epoch seconds, used for the HTTP-date form. Returns None when the
    header is absent or unusable, so the caller falls back to plain backoff.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        # RFC 9110 allows only integers; fractions are accepted because being
        # lenient costs nothing. A huge digit string becomes inf and is capped.
        return _clamp_retry_after(float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # "-0000" yields a naive datetime; HTTP-dates are always GMT.
        when = when.replace(tzinfo=UTC)
    try:
        seconds = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return _clamp_retry_after(seconds)


def _clamp_retry_after(seconds: float) -> float | None:
    if math.isnan(seconds):
        return None
    # A date in the past means "retry now", not "ignore the header".
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def backoff_delay(
    attempt: int,
    initial: float,
    maximum: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with full jitter; ``attempt`` is 1 for the first retry.

    Full jitter (uniform over [0, ceiling]) spreads the retries of many rows
    that failed together, so a recovering Cartrack is not hit by a wall of
    simultaneous requests.
    """
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    ceiling = min(maximum, initial * 2.0**exponent)
    return rand() * max(ceiling, 0.0)


def retry_delay(
    attempt: int,
    initial: float,
    maximum: float,
    retry_after: float | None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The wait before the next attempt: backoff, but never shorter than Retry-After."""
    delay = backoff_delay(attempt, initial, maximum, rand)
    if retry_after is None or math.isnan(retry_after):
        return delay
    # Clamped again because callers may pass a value that did not come from
    # parse_retry_after; the one-hour bound is a SPEC rule, not a parser detail.
    return max(delay, min(max(retry_after, 0.0), RETRY_AFTER_CAP))


class CartrackClient:
    """Sends one event per request. ``send`` reports problems, it never raises them."""

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout: float,
        *,
        concurrency: int = 16,
        clock: Callable[[], float] = time.time,
        on_response: Callable[[str, float], None] | None = None,
    ) -> None:
        # SPEC: redirects are never followed (the client has no way to): following
        # one would re-send the API key to wherever the Location points.
        self._http = Http1Client(
            url,
            {"Content-Type": "application/json", "X-API-KEY": api_key},
            limit=concurrency,
            body_limit=_READ_LIMIT,
            user_agent=f"cartrack-relay/{__version__}",
        )
        self._api_key = api_key
        self._timeout = timeout
        self._clock = clock
        # Told of every request's outcome label and duration (metrics).
        self._on_response = on_response

    async def close(self) -> None:
        await self._http.close()

    async def send(self, body: bytes) -> Outcome:
        # One coroutine per event (the forward drain is CPU-bound on the event loop).
        started = time.monotonic()
        outcome: Outcome
        try:
            response = await self._http.post(body, self._timeout)
        except TimeoutError:
            outcome = self._network_failure("timeout", f"timeout after {self._timeout:g}s", started)
        except OSError as exc:  # refused, reset, closed early, TLS, a malformed answer
            outcome = self._network_failure(
                "connection_error", f"connection error: {type(exc).__name__}: {exc}", started
            )
        else:
            status = response.status
            if 200 <= status <= 299 or status == 409:
                # Accepted (classify's SENT), the common case kept short: nothing of
                # the answer is kept.
                outcome = Outcome(Verdict.SENT, status, "", None, time.monotonic() - started)
            else:
                outcome = self._answered(response, started)
        if self._on_response is not None:
            self._on_response(outcome.label, outcome.elapsed)
        return outcome

    def _answered(self, response: Response, started: float) -> Outcome:
        status = response.status
        if 300 <= status <= 399:
            log.error(
                "cartrack_redirect",
                status=status,
                location=self._redact(response.header("location") or ""),
            )
        return Outcome(
            verdict=classify(status),
            status=status,
            detail=self._detail(response),
            retry_after=parse_retry_after(response.header("retry-after"), self._clock()),
            elapsed=time.monotonic() - started,
        )

    def _detail(self, response: Response) -> str:
        text = self._redact(response.body.decode("utf-8", errors="replace"))
        if response.cut:
            return text[: DETAIL_LIMIT - len(response.cut)] + response.cut
        return text[:DETAIL_LIMIT]

    def _network_failure(self, failure: str, description: str, started: float) -> Outcome:
        return Outcome(
            verdict=Verdict.TRANSIENT,
            status=None,
            detail=self._redact(description)[:DETAIL_LIMIT],
            retry_after=None,
            elapsed=time.monotonic() - started,
            failure=failure,
        )

    def _redact(self, text: str) -> str:
        # The detail is stored in the outbox and logged; a server or proxy that
        # echoes request headers back would otherwise leak the key into both.
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, _REDACTED)
        return text
