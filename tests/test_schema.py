"""Opening and migrating the outbox file: what is accepted, what is refused untouched."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from relay.outbox import schema
from relay.outbox.schema import (
    OUR_TABLES,
    Migration,
    OutboxError,
    connect,
    latest_version,
    migrate,
    migrations,
)
from relay.outbox.storage import Outbox

# A row per table of schema version 1, to prove migrations keep data.
V1_SAMPLE = [
    "INSERT INTO positions (provider_event_id, vehicle_id, event_ts, event_type, status,"
    " next_attempt_at, received_at, updated_at, payload, source) VALUES"
    " ('frotcom:1:2023-10-25T16:29:31.000Z', '1', '2023-10-25T16:29:31.000Z', 'PERIODIC',"
    " 'pending', '2023-10-25T16:30:00.000Z', '2023-10-25T16:30:00.000Z',"
    " '2023-10-25T16:30:00.000Z', '{}', '{}')",
    "INSERT INTO quarantine (received_at, vehicle_id, reason, raw, fingerprint) VALUES"
    " ('2023-10-25T16:30:00.000Z', NULL, 'why', '[]', 'f')",
    "INSERT INTO vehicle_state VALUES ('1', '2023-10-25T16:29:31.000Z', 1,"
    " '2023-10-25T16:30:00.000Z')",
    "INSERT INTO relay_state VALUES ('k', 'v', '2023-10-25T16:30:00.000Z')",
]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with closing(connect(tmp_path / "fresh.sqlite3", create=True)) as conn:
        yield conn


def shape(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, str, str, str | None]]]:
    """user_version and every schema object, SQL with whitespace normalised."""
    objects = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    return version, [
        (t, n, tbl, " ".join(sql.split()) if sql else None) for t, n, tbl, sql in objects
    ]


def pragma(conn: sqlite3.Connection, name: str) -> object:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


# -- fresh files -------------------------------------------------------------------------


def test_fresh_outbox_is_latest_wal_and_durable(fresh: sqlite3.Connection) -> None:
    assert pragma(fresh, "user_version") == latest_version() == len(migrations())
    assert pragma(fresh, "journal_mode") == "wal"
    assert pragma(fresh, "synchronous") == 2  # FULL
    assert pragma(fresh, "foreign_keys") == 1
    tables = {r[0] for r in fresh.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == OUR_TABLES


async def test_every_connection_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await Outbox.open(path)
    try:
        async with box._conn.execute("PRAGMA synchronous") as cursor:
            assert await cursor.fetchone() == (2,)
        async with box._conn.execute("PRAGMA journal_mode") as cursor:
            assert await cursor.fetchone() == ("wal",)
        # The CLI opens the same file while the daemon has it open.
        with closing(connect(path)) as cli:
            assert pragma(cli, "synchronous") == 2
            assert cli.execute("SELECT count(*) FROM positions").fetchone() == (0,)
        with closing(connect(path, readonly=True)) as reader:
            assert pragma(reader, "user_version") == latest_version()
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.execute("DELETE FROM relay_state")
    finally:
        await box.close()


def test_missing_file_is_not_created_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "outbox.sqlite3"
    with pytest.raises(OutboxError, match="no outbox here") as info:
        connect(path)
    assert str(path) in str(info.value)
    assert not path.parent.exists()


def test_create_makes_missing_directories(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    with closing(connect(path, create=True)) as conn:
        assert pragma(conn, "user_version") == latest_version()


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="not a regular file"):
        connect(tmp_path, create=True)


def test_empty_file_becomes_an_outbox_only_for_the_daemon(tmp_path: Path) -> None:
    # e.g. created with `touch` by a provisioning script
    path = tmp_path / "outbox.sqlite3"
    path.touch()
    with pytest.raises(OutboxError, match="empty file"):
        connect(path)  # what CLI commands do: looking must not create an outbox
    assert path.stat().st_size == 0
    with closing(connect(path, create=True)) as conn:
        assert pragma(conn, "user_version") == latest_version()


# -- migrations --------------------------------------------------------------------------


def build_by_hand(path: Path, upto: int) -> None:
    """A database as an older relay left it: migrations 1..upto applied with executescript."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for mig in migrations()[:upto]:
            conn.executescript(mig.sql)
            conn.execute(f"PRAGMA user_version = {mig.version}")
            if mig.version == 1:
                for sql in V1_SAMPLE:
                    conn.execute(sql)


@pytest.mark.parametrize("version", range(latest_version() + 1))
def test_migrated_database_equals_a_fresh_one(
    tmp_path: Path, fresh: sqlite3.Connection, version: int
) -> None:
    # version 0 is migrate() from nothing; the latest compares migrate() with the files
    # applied by hand; versions in between are upgrades an operator would run.
    path = tmp_path / f"v{version}.sqlite3"
    build_by_hand(path, version)
    with closing(connect(path)) as conn:
        assert shape(conn) == shape(fresh)
        assert pragma(conn, "journal_mode") == "wal"
        kept = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sorted(OUR_TABLES)]
    assert kept == ([1, 1, 1, 1] if version >= 1 else [0, 0, 0, 0])


def test_version_2_indexes_the_rows_a_version_1_file_already_holds(tmp_path: Path) -> None:
    # Version 2 swapped the index over every row for partial ones: rows written under
    # version 1 must be found through them (counts, purge), not only new ones.
    path = tmp_path / "v1.sqlite3"
    build_by_hand(path, 1)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        template = V1_SAMPLE[0]
        for n, state in enumerate(["sent", "sent", "failed", "held"]):
            conn.execute(
                template.replace("frotcom:1:", f"frotcom:{n + 2}:").replace(
                    "'pending'", f"'{state}'"
                )
            )
    with closing(connect(path)) as conn:
        assert pragma(conn, "user_version") == latest_version()
        assert pragma(conn, "integrity_check") == "ok"
        assert schema.status_counts(conn) == {"pending": 1, "held": 1, "sent": 2, "failed": 1}
        old = "DELETE FROM positions WHERE status = 'sent' AND updated_at < '2024-01-01'"
        plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {old}")]
        assert plan == ["SEARCH positions USING INDEX positions_done (status=? AND updated_at<?)"]
        assert conn.execute(old).rowcount == 2


def test_migration_files_are_numbered_and_complete() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.name and m.sql.strip() for m in found)


def test_migrate_is_a_no_op_when_current(fresh: sqlite3.Connection) -> None:
    before = shape(fresh)
    assert migrate(fresh) == latest_version()
    assert shape(fresh) == before


def broken(version: int) -> Migration:
    return Migration(
        version,
        "broken",
        "CREATE TABLE extra (x INTEGER);\n"
        "CREATE INDEX extra_x ON extra (x);\n"
        "-- the next statement fails; nothing of this migration may remain\n"
        "INSERT INTO no_such_table VALUES (1);\n",
    )


@pytest.mark.parametrize("start", [0, 1])
def test_failed_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: int
) -> None:
    path = tmp_path / "outbox.sqlite3"
    build_by_hand(path, start)
    real = migrations()
    monkeypatch.setattr(schema, "migrations", lambda: [*real, broken(len(real) + 1)])
    with pytest.raises(
        OutboxError,
        match=r"cannot upgrade the outbox from schema version .*: no such table: no_such_table",
    ) as info:
        connect(path)
    assert str(path) in str(info.value)
    monkeypatch.undo()
    with closing(sqlite3.connect(path)) as conn:
        # Migration 1 (if it was due) committed on its own; the broken one left nothing.
        assert pragma(conn, "user_version") == len(real)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in names
        assert "extra_x" not in names
        assert names >= OUR_TABLES
    # A fixed relay then opens the file normally.
    with closing(connect(path)) as conn:
        assert pragma(conn, "user_version") == latest_version()


def test_locked_file_is_not_migrated_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "outbox.sqlite3"
    build_by_hand(path, 0)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process is writing
        with pytest.raises(OutboxError, match=r"cannot upgrade .*: database is locked"):
            connect(path)
        other.execute("ROLLBACK")
    with closing(connect(path)) as conn:
        assert pragma(conn, "user_version") == latest_version()


def test_failed_migration_leaves_no_open_transaction(
    fresh: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = migrations()
    monkeypatch.setattr(schema, "migrations", lambda: [*real, broken(len(real) + 1)])
    with pytest.raises(sqlite3.OperationalError):
        migrate(fresh)
    assert not fresh.in_transaction
    assert pragma(fresh, "user_version") == len(real)


def test_migration_statements_may_hold_semicolons_and_comments(
    fresh: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = migrations()
    tricky = Migration(
        len(real) + 1,
        "tricky",
        "-- a comment; with a semicolon\n"
        "CREATE TABLE notes (\n"
        "    body TEXT DEFAULT 'a;b' -- trailing; comment\n"
        ");\n"
        "\n"
        "/* block; comment */\n"
        "INSERT INTO notes DEFAULT VALUES;  -- one row\n"
        "-- the end;\n",
    )
    monkeypatch.setattr(schema, "migrations", lambda: [*real, tricky])
    assert migrate(fresh) == len(real) + 1
    assert fresh.execute("SELECT body FROM notes").fetchall() == [("a;b",)]


def test_incomplete_migration_statement_is_refused_before_changes(
    fresh: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = migrations()
    bad = Migration(len(real) + 1, "bad", "CREATE TABLE notes (x);\nCREATE TABLE half (\n")
    monkeypatch.setattr(schema, "migrations", lambda: [*real, bad])
    with pytest.raises(RuntimeError, match="incomplete SQL statement"):
        migrate(fresh)
    assert "notes" not in {r[0] for r in fresh.execute("SELECT name FROM sqlite_master")}


# -- files that are not ours -------------------------------------------------------------


def refuse_untouched(path: Path, match: str) -> OutboxError:
    before = path.read_bytes()
    for kwargs in ({}, {"create": True}, {"readonly": True}):
        with pytest.raises(OutboxError, match=match) as info:
            connect(path, **kwargs)
        assert str(info.value).startswith(f"{path}: ")
        assert path.read_bytes() == before
    # A read-only open of a WAL file may leave an empty -wal (and -shm) behind: no changes.
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    return info.value


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with closing(connect(path, create=True)) as conn:
        conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    error = refuse_untouched(path, "newer than this relay understands")
    assert f"schema version {latest_version() + 1}" in str(error)


@pytest.mark.parametrize(
    "content",
    [
        b"not a database at all, just text\n" * 200,
        bytes(range(256)) * 64,
        b"SQLite format 3\x00" + b"\xff" * 4080,  # right magic, corrupt header
    ],
)
def test_non_sqlite_file_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(content)
    refuse_untouched(path, "not a usable outbox database")


def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('x')")
        conn.commit()
    error = refuse_untouched(path, "not a cartrack-relay outbox")
    assert "customers" in str(error)


def test_foreign_database_with_a_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE positions (id INTEGER PRIMARY KEY)")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    refuse_untouched(path, "tables are missing; not our outbox")


async def test_outbox_open_refuses_with_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(OutboxError, match="not a usable outbox database"):
        await Outbox.open(path)
    assert path.read_bytes() == b"garbage" * 1000


@pytest.mark.parametrize("name", ["a?b", "c#d", "e%20f", "g h", "clé"])
def test_path_is_taken_literally(tmp_path: Path, name: str) -> None:
    path = tmp_path / name / "outbox.sqlite3"
    with closing(connect(path, create=True)) as conn:
        assert pragma(conn, "user_version") == latest_version()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with closing(connect(path, readonly=True)) as conn:
        assert pragma(conn, "user_version") == latest_version()
