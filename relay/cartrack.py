"""Cartrack Telematics Data Ingestion client: one POST per event, and the retry maths.

Nothing here touches the outbox. The client turns every possible result of a
request (a response, a timeout, a broken connection) into an ``Outcome`` whose
``Verdict`` tells the forwarder what to do with the row, so the forwarder never
has to know about HTTP status codes or aiohttp exceptions.
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

import aiohttp
import structlog

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
        session: aiohttp.ClientSession,
        url: str,
        api_key: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
        on_response: Callable[[str, float], None] | None = None,
    ) -> None:
        self._session = session
        self._url = url
        self._api_key = api_key
        self._timeout = timeout
        # Built once: aiohttp copies them into each request anyway.
        self._headers = {"Content-Type": "application/json", "X-API-KEY": api_key}
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        # Told of every request's outcome label and duration (metrics).
        self._on_response = on_response

    async def send(self, body: bytes) -> Outcome:
        # One coroutine per event (the forward drain is CPU-bound on the event loop).
        started = time.monotonic()
        outcome: Outcome
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=self._headers,
                # SPEC: never follow redirects. Following one would re-send the
                # API key to wherever the Location points.
                allow_redirects=False,
                timeout=self._client_timeout,
            ) as response:
                status = response.status
                if 200 <= status <= 299 or status == 409:
                    # Accepted (classify's SENT), the common case kept short: nothing
                    # of the answer is kept. A body not in yet is read (bounded) so the
                    # connection is reused; one that came with the headers (the usual
                    # short answer) already let aiohttp return the connection.
                    if not response.content.is_eof():
                        await _read_bounded(response)
                    outcome = Outcome(Verdict.SENT, status, "", None, time.monotonic() - started)
                else:
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), self._clock()
                    )
                    if 300 <= status <= 399:
                        log.error(
                            "cartrack_redirect",
                            status=status,
                            location=self._redact(response.headers.get("Location", "")),
                        )
                    outcome = Outcome(
                        verdict=classify(status),
                        status=status,
                        detail=await self._read_detail(response),
                        retry_after=retry_after,
                        elapsed=time.monotonic() - started,
                    )
        except TimeoutError:
            # Checked before OSError/ClientError: TimeoutError is an OSError, and
            # aiohttp's own timeout errors subclass both.
            outcome = self._network_failure("timeout", f"timeout after {self._timeout:g}s", started)
        except (aiohttp.ClientError, OSError) as exc:
            outcome = self._network_failure(
                "connection_error", f"connection error: {type(exc).__name__}: {exc}", started
            )
        if self._on_response is not None:
            self._on_response(outcome.label, outcome.elapsed)
        return outcome

    async def _read_detail(self, response: aiohttp.ClientResponse) -> str:
        body, note = await _read_bounded(response)
        text = self._redact(body.decode("utf-8", errors="replace"))
        if note:
            return text[: DETAIL_LIMIT - len(note)] + note
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


async def _read_bounded(response: aiohttp.ClientResponse) -> tuple[bytes, str]:
    """Up to _READ_LIMIT bytes of the body, and a note if reading it broke off.

    The status is already known and decides the verdict; a body that breaks off must
    not turn an accepted (2xx) event into a retry or a rejection into a transient
    error. A longer body is left unread (the connection is then closed, not reused).
    Timeouts are left to the caller: after the total timeout the connection is
    unusable anyway.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        # StreamReader.read(n) may return less than n before EOF.
        while size < _READ_LIMIT:
            chunk = await response.content.read(_READ_LIMIT - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except aiohttp.ClientError as exc:
        return b"".join(chunks), f" [body read failed: {type(exc).__name__}]"
    return b"".join(chunks), ""
