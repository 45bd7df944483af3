"""The writer's connection: its WAL written a commit at a time, its statements run in C.

Two costs of the outbox writer's thread that only it pays (bench/README.md, "The
ingest path, eighth pass"), both handled in relay/_sqlrun.c on the sqlite3 module's
own connection and SQLite library:

- SQLite writes each WAL frame with two system calls, so a group's COMMIT made ~200
  of them. The ``relay-wal`` VFS gathers a commit's frames and writes them at its
  sync, up to 128 KiB a call. It needs every commit to sync (synchronous=FULL or
  EXTRA), and refuses a PRAGMA that would turn that off.
- Through the sqlite3 module, each statement binds its values with the GIL held,
  copying every text, and gives the GIL up twice (around step, then reset), each time
  winning it back from the busy event loop. A ``_sqlrun.Statement`` binds in place
  and gives it up once.

Only ``WriterConnection`` keeps C statements. Where relay/_sqlrun.c was not built (no
C compiler at install), or does not know this Python or finds no SQLite beside the
sqlite3 module, the writer opens the plain file and runs the same statements through
the sqlite3 module; ``native()`` says which, for the log.
"""

from __future__ import annotations

import collections
import sqlite3
import sys
import urllib.parse
from pathlib import Path
from typing import Any

try:
    import _sqlite3

    from relay import _sqlrun
except ImportError:  # built without a C compiler, or a Python without _sqlite3 as a module
    _sqlrun = None  # type: ignore[assignment]

# The sqlite3 module's Connection starts with its database handle on these versions
# (Modules/_sqlite/connection.h); relay/_sqlrun.c reads it there.
_LAYOUT_KNOWN = (3, 11) <= sys.version_info[:2] <= (3, 13)
# Prepared C statements a writer connection keeps, least recently used dropped first:
# a few dozen padded INSERT sizes, and vehicle-state UPSERTs, which cannot be padded.
STATEMENTS_KEPT = 128


def _link() -> str | None:
    """Why relay/_sqlrun.c is not used, or None when it is."""
    if _sqlrun is None:
        return "relay._sqlrun is not built"
    if not _LAYOUT_KNOWN:
        return f"relay._sqlrun does not know Python {sys.version_info[0]}.{sys.version_info[1]}"
    path = getattr(_sqlite3, "__file__", None)
    if path is None:
        return "the sqlite3 module is built into Python"
    try:
        version = _sqlrun.link(path, sqlite3.Connection, sqlite3.ProgrammingError)
        vfs = _sqlrun.register_vfs()
    except OSError as exc:
        return str(exc)
    if version != sqlite3.sqlite_version:
        return f"SQLite {version} beside the sqlite3 module, which reports {sqlite3.sqlite_version}"
    if vfs != WAL_VFS:
        return f"relay._sqlrun registered the VFS {vfs!r}, not {WAL_VFS!r}"
    return None


WAL_VFS = "relay-wal"
UNLINKED: str | None = _link()


def native() -> str:
    """For the log: "compiled", or why the writer runs on the sqlite3 module alone."""
    return "compiled" if UNLINKED is None else f"python ({UNLINKED})"


def writer_database(path: Path) -> tuple[str, bool]:
    """What the writer connection opens: ``(database, uri)`` for sqlite3.connect."""
    if UNLINKED is not None:
        return str(path), False
    return f"file:{urllib.parse.quote(str(path))}?vfs={WAL_VFS}", True


class WriterConnection(sqlite3.Connection):
    """The outbox writer's connection: it keeps its statements prepared in C."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: collections.OrderedDict[str, Any] | None = (
            collections.OrderedDict() if UNLINKED is None else None
        )

    def close(self) -> None:
        if self.statements:
            self.statements.clear()  # finalized while the handle is open
        super().close()


def execute(conn: sqlite3.Connection, sql: str) -> None:
    """A statement without parameters (BEGIN IMMEDIATE, COMMIT)."""
    statement = _prepared(conn, sql)
    if statement is None:
        conn.execute(sql)
    else:
        _call(statement.run, conn, _NO_VALUES, 0, 0, 1)


_NO_VALUES: list[Any] = []


def execute_rows(
    conn: sqlite3.Connection, sql: str, values: list[Any], start: int, rows: int, width: int
) -> None:
    """Run ``sql`` on ``rows`` rows of ``values`` from ``start``, ``width`` values each.

    A statement with room for more rows than given is filled with copies of the first
    (INSERT OR IGNORE padding, relay/outbox/writer.py).
    """
    statement = _prepared(conn, sql)
    if statement is not None:
        _call(statement.run, conn, values, start, rows, width)
        return
    chunk = values[start : start + rows * width]
    size = sql.count("?") // width
    if size > rows:
        chunk += chunk[:width] * (size - rows)
    conn.execute(sql, chunk)


def _prepared(conn: sqlite3.Connection, sql: str) -> Any:
    """The connection's C statement for ``sql``, or None: the sqlite3 module runs it."""
    statements = getattr(conn, "statements", None)
    if statements is None:
        return None
    statement = statements.get(sql)
    if statement is not None:
        statements.move_to_end(sql)
        return statement
    statement = statements[sql] = _call(_sqlrun.Statement, conn, sql)
    if len(statements) > STATEMENTS_KEPT:
        statements.popitem(last=False)
    return statement


def _call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except _sqlrun.Failure as failure:
        code, message = failure.args
        raise sqlite_error(code, message) from None


# The sqlite3 module's exception for each primary result code (Modules/_sqlite/util.c);
# any other code is a DatabaseError there too.
_ERRORS: dict[int, type[sqlite3.Error]] = {
    **dict.fromkeys((1, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15, 16, 17), sqlite3.OperationalError),
    **dict.fromkeys((2, 12), sqlite3.InternalError),
    18: sqlite3.DataError,
    **dict.fromkeys((19, 20), sqlite3.IntegrityError),
    **dict.fromkeys((21, 25), sqlite3.InterfaceError),
}
_PRIMARY_NAMES = frozenset(
    [
        "ERROR",
        "INTERNAL",
        "PERM",
        "ABORT",
        "BUSY",
        "LOCKED",
        "NOMEM",
        "READONLY",
        "INTERRUPT",
        "IOERR",
        "CORRUPT",
        "NOTFOUND",
        "FULL",
        "CANTOPEN",
        "PROTOCOL",
        "EMPTY",
        "SCHEMA",
        "TOOBIG",
        "CONSTRAINT",
        "MISMATCH",
        "MISUSE",
        "NOLFS",
        "AUTH",
        "FORMAT",
        "RANGE",
        "NOTADB",
        "NOTICE",
        "WARNING",
    ]
)
# Result codes by value, extended ones too, from the constants the sqlite3 module has.
_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(sqlite3).items()
    if isinstance(value, int)
    and name.startswith("SQLITE_")
    and name[len("SQLITE_") :].split("_")[0] in _PRIMARY_NAMES
}


def sqlite_error(code: int, message: str) -> BaseException:
    """What the sqlite3 module raises for SQLite's (extended) result ``code``."""
    primary = code & 0xFF
    if primary == 7:  # NOMEM
        return MemoryError()
    error = _ERRORS.get(primary, sqlite3.DatabaseError)(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    error.sqlite_errorname = _NAMES.get(code, "SQLITE_UNKNOWN")  # type: ignore[attr-defined]
    return error
