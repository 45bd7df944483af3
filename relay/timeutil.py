"""Time: one injectable clock, the one text format the outbox and Cartrack use, and a
sleep that an event cuts short.

Instants travel through the relay as integer milliseconds since the epoch (UTC), which
makes ordering and arithmetic exact; they are stored and sent as ISO-8601 text that
always ends in ``Z`` with exactly three fractional digits, so text order equals time
order in SQLite and two spellings of one instant give one ``provider_event_id``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], float]
"""Returns the current time as epoch seconds; ``time.time`` in production."""

system_clock: Clock = time.time

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)
# Strict ISO-8601 date-time: datetime.fromisoformat alone would also take week dates,
# ordinal dates and a bare date, none of which Frotcom sends.
# ASCII: \d would otherwise also match other scripts' digits.
_ISO_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|z|[+-]\d{2}(:?\d{2})?)?",
    re.ASCII,
)
# The relay's own spelling, which is also what Frotcom sends: such a text is its own
# canonical form, so the hot path neither normalises it nor formats the instant again.
_CANONICAL_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", re.ASCII)


def parse_instant(text: str) -> tuple[int, str]:
    """Epoch milliseconds and the canonical text of a Frotcom timestamp. Raises ValueError."""
    if _CANONICAL_RE.fullmatch(text):
        # fromisoformat (3.11+) reads this form whole, ``Z`` included, and still checks
        # every field's range; years 1..9999 UTC cannot fall outside the format.
        return _epoch_ms(datetime.fromisoformat(text)), text
    ms = parse_timestamp(text)
    return ms, format_ms(ms)


def _epoch_ms(parsed: datetime) -> int:
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_timestamp(text: str) -> int:
    """Parse Frotcom's ISO-8601 text into epoch milliseconds (UTC).

    An explicit offset is honoured; a timestamp without a zone is UTC (Frotcom's
    documented convention). Sub-millisecond digits are truncated. Raises ValueError.
    """
    if not _ISO_RE.fullmatch(text):
        raise ValueError("not an ISO-8601 date-time")
    fraction = ""
    head = text
    m = re.search(r"\.(\d+)", text)
    if m:
        fraction = m.group(1)
        # fromisoformat in 3.11 accepts 3 or 6 digits only; normalise to 6.
        head = text[: m.start()] + "." + (fraction + "000000")[:6] + text[m.end() :]
    if head.endswith(("Z", "z")):
        head = head[:-1] + "+00:00"
    parsed = datetime.fromisoformat(head)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ms = _epoch_ms(parsed)
    if not _MIN_MS <= ms <= _MAX_MS:
        # An offset pushed the instant outside years 1..9999 UTC: it could not be formatted.
        raise ValueError("instant out of range")
    return ms


def format_ms(ms: int) -> str:
    """Epoch milliseconds to ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    m = _EPOCH + timedelta(milliseconds=ms)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{ms % 1000:03d}Z"
    )


def format_epoch(seconds: float) -> str:
    return format_ms(int(seconds * 1000))


def now_iso(clock: Clock = system_clock) -> str:
    return format_epoch(clock())


async def sleep_unless(event: asyncio.Event, timeout: float) -> bool:
    """Sleep up to ``timeout`` seconds; True (at once) if ``event`` is set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
