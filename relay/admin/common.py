"""What every operator command shares: the connection, its errors, and time filters."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from relay.outbox.schema import OutboxError, connect
from relay.timeutil import format_ms, parse_timestamp

SNIPPET = 120  # characters of Cartrack's detail shown in a table cell


class FilterError(ValueError):
    """An argument of an operator command that cannot be used; the message names it."""


class AdminError(Exception):
    """The outbox could not be read or changed right now (locked too long, I/O error)."""


@contextlib.contextmanager
def open_outbox(path: Path) -> Iterator[sqlite3.Connection]:
    """The outbox connection, with SQLite failures turned into one-line errors."""
    conn = connect(path)
    try:
        yield conn
    except sqlite3.OperationalError as exc:
        raise AdminError(f"{path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"{path}: not a usable outbox database: {exc}") from None
    finally:
        conn.close()


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every number of a report comes from the same state.

    Under WAL it does not hold up the daemon's writes.
    """
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def parse_time(text: str) -> str:
    """An operator's ISO-8601 time as the outbox spells it; ValueError if it is not one."""
    try:
        return format_ms(parse_timestamp(text))
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not an ISO-8601 time (e.g. 2024-05-01T00:00:00Z)") from None


def time_window(
    since: str | None, until: str | None, names: tuple[str, str] = ("since", "until")
) -> tuple[str | None, str | None]:
    """``[since, until)`` in the outbox's spelling; FilterError naming the bad bound."""
    bounds: list[str | None] = []
    for name, text in zip(names, (since, until), strict=True):
        try:
            bounds.append(None if text is None else parse_time(text))
        except ValueError as exc:
            raise FilterError(f"{name}: {exc}") from None
    lo, hi = bounds
    # Normalised spellings: text order is time order.
    if lo is not None and hi is not None and lo >= hi:
        raise FilterError(f"{names[0]}: must be before {names[1]}")
    return lo, hi


def snippet(text: str | None, limit: int = SNIPPET) -> str | None:
    """Cartrack's detail on one line, cut to ``limit`` characters."""
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def age_seconds(now_ms: int, ts: str | None) -> float | None:
    return None if ts is None else round((now_ms - parse_timestamp(ts)) / 1000, 3)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
