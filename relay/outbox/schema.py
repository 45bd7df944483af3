"""Opening the outbox file safely and migrating it, shared by the daemon and the CLI.

Migrations are the numbered ``migrations/NNNN_*.sql`` files in this package. Each is
applied in one transaction together with its ``PRAGMA user_version`` bump, so a crash
mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

BUSY_TIMEOUT_MS = 5000
OUR_TABLES = {"positions", "quarantine", "vehicle_state", "relay_state"}

# Rows by status in one statement (one read snapshot), each count a pass over its own
# partial index: since schema version 2 no index holds every row, so that marking a
# row sent touches as few index entries as it can. Literal statuses: a bound parameter
# would keep SQLite from using a partial index.
STATUS_COUNTS = """
SELECT (SELECT count(*) FROM positions INDEXED BY positions_pending WHERE status = 'pending'),
       (SELECT count(*) FROM positions INDEXED BY positions_held WHERE status = 'held'),
       (SELECT count(*) FROM positions INDEXED BY positions_done WHERE status = 'sent'),
       (SELECT count(*) FROM positions INDEXED BY positions_done WHERE status = 'failed')
"""
STATUS_COUNTS_ORDER = ("pending", "held", "sent", "failed")


class OutboxError(Exception):
    """The outbox file cannot be used; the message names the file."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("relay.outbox").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    expected = list(range(1, len(found) + 1))
    if [mig.version for mig in found] != expected:
        raise RuntimeError(f"migrations must be numbered 1..n, found {[m.version for m in found]}")
    return found


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows by status: pending, held, sent, failed."""
    return dict(zip(STATUS_COUNTS_ORDER, conn.execute(STATUS_COUNTS).fetchone(), strict=True))


def latest_version() -> int:
    return migrations()[-1].version


def configure(conn: sqlite3.Connection) -> None:
    """Connection settings every user of the file needs."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # FULL: a commit that acknowledged Frotcom survives an OS crash or power loss.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def connect(path: Path, *, create: bool = False, readonly: bool = False) -> sqlite3.Connection:
    """Open an existing outbox (or create one) and bring its schema up to date.

    Raises OutboxError naming the file when it is not a SQLite database, belongs to
    something else, or comes from a newer relay; the file is not modified then.
    """
    path = Path(path)
    if not create and not path.exists():
        raise OutboxError(f"{path}: no outbox here (the daemon creates it on first start)")
    if path.exists() and not path.is_file():
        raise OutboxError(f"{path}: not a regular file")
    if not create and path.stat().st_size == 0:
        # Only the daemon creates an outbox; a CLI command looking at an empty file
        # must not turn it into one.
        raise OutboxError(f"{path}: empty file, no outbox yet (the daemon creates it)")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Percent-encoded: in a URI, "?", "#" and "%" in a directory name would otherwise
    # silently open a different file.
    uri = f"file:{quote(str(path))}?mode={'ro' if readonly else 'rwc'}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise OutboxError(f"{path}: cannot open: {exc}") from None
    try:
        configure(conn)
        version = _check_identity(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise OutboxError(f"{path}: not a usable outbox database: {exc}") from None
    except OutboxError:
        conn.close()
        raise
    if readonly:
        return conn
    try:
        if version < latest_version():
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn)
        elif conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.Error as exc:
        # Locked too long, disk full, a failed migration: the file itself is fine and
        # still at its previous version (each migration is one transaction).
        conn.close()
        raise OutboxError(
            f"{path}: cannot upgrade the outbox from schema version {version} "
            f"to {latest_version()}: {exc}"
        ) from None
    return conn


def _check_identity(conn: sqlite3.Connection, path: Path) -> int:
    # Reading sqlite_master is the first real read: a file that is not a database fails here.
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > latest_version():
        raise OutboxError(
            f"{path}: schema version {version} is newer than this relay understands "
            f"({latest_version()}); upgrade cartrack-relay"
        )
    if version == 0 and tables:
        raise OutboxError(
            f"{path}: holds tables that are not a cartrack-relay outbox ({', '.join(sorted(tables))})"
        )
    if version > 0 and not tables >= OUR_TABLES:
        raise OutboxError(
            f"{path}: schema version {version} but tables are missing; not our outbox"
        )
    return int(version)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than the file's version; returns the new version."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for mig in migrations():
        if mig.version <= current:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Version check again inside the write lock: another process may have
            # migrated between our read and our lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] >= mig.version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(mig.sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {mig.version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        current = mig.version
    return current


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            stripped = buffer.strip()
            if stripped and not all(
                part.strip().startswith("--") or not part.strip() for part in stripped.splitlines()
            ):
                statements.append(stripped)
            buffer = ""
    if buffer.strip() and not all(
        p.strip().startswith("--") or not p.strip() for p in buffer.splitlines()
    ):
        raise RuntimeError(f"incomplete SQL statement in migration: {buffer[:80]!r}")
    return statements
