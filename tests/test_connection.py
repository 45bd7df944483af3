"""relay/_sqlrun.c through relay.outbox.connection: the writer's WAL and C statements.

The C statements must behave exactly as the sqlite3 module does for the same SQL and
values: the same rows stored, the same exceptions. The relay-wal VFS must leave the
file as the default VFS would: every committed row readable at once by any other
connection or process, nothing of an uncommitted transaction after a kill -9, and
no way to turn off the per-commit sync it depends on.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import has_c_compiler

from relay.outbox import connection
from relay.outbox.connection import (
    STATEMENTS_KEPT,
    WriterConnection,
    execute,
    execute_rows,
    writer_database,
)
from relay.outbox.storage import Outbox
from relay.timeutil import format_ms
from tests.outbox_helpers import NOW_MS, batch, position, store

native = pytest.mark.skipif(connection.UNLINKED is not None, reason=str(connection.UNLINKED))


def open_writer(path: Path) -> WriterConnection:
    database, uri = writer_database(path)
    conn = sqlite3.connect(database, uri=uri, factory=WriterConnection, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[WriterConnection]:
    conn = open_writer(tmp_path / "w.sqlite3")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT NOT NULL)")
    yield conn
    conn.close()


def test_the_writer_is_native_wherever_a_compiler_is() -> None:
    # setup.py marks the extension optional; where a compiler is, a writer on the sqlite3
    # module alone would be a silently slower relay.
    if not has_c_compiler():
        pytest.skip("no C compiler: the writer runs on the sqlite3 module")
    assert connection.UNLINKED is None
    assert connection.native() == "compiled"


# -- statements: the sqlite3 module's behaviour ----------------------------------------

VALUES = [
    0,
    -1,
    2**63 - 1,
    -(2**63),
    True,
    1.5,
    -0.0,
    1e300,
    "",
    "ascii",
    "é中😀",
    "nul\x00inside",
    None,
    b"",
    b"\x00\xff",
]


@native
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_a_value_is_stored_as_the_sqlite3_module_stores_it(
    writer: WriterConnection, value: Any
) -> None:
    plain = sqlite3.connect(":memory:")
    plain.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT NOT NULL)")
    plain.execute("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["a", value, "x"])
    execute_rows(writer, "INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["a", value, "x"], 0, 1, 3)
    query = "SELECT typeof(v), v, hex(v) FROM t"
    assert writer.execute(query).fetchall() == plain.execute(query).fetchall()


@native
def test_rows_are_taken_from_start_and_padded_with_the_first(writer: WriterConnection) -> None:
    values = ["skip", 0, "x", "a", 1, "x", "b", 2, "x"]
    sql = "INSERT OR IGNORE INTO t (k, v, n) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?), (?, ?, ?)"
    before = writer.total_changes
    execute_rows(writer, sql, values, 3, 2, 3)
    assert writer.total_changes - before == 2
    assert writer.execute("SELECT k, v FROM t ORDER BY id").fetchall() == [("a", 1), ("b", 2)]


FAILURES = [
    ("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["dup", 1, "x"]),  # UNIQUE
    ("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["k", 1, None]),  # NOT NULL
    ("INSERT INTO t (id, k, v, n) VALUES (?, ?, ?, ?)", ["one", "k", 1, "x"]),  # mismatch
    ("INSERT INTO nowhere (k) VALUES (?)", ["k"]),  # no such table, when preparing
    ("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["k", 2**63, "x"]),  # too big for SQLite
    ("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["k", object(), "x"]),  # no such type
    ("INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["k", "\ud800", "x"]),  # not UTF-8
]


def _raised(call: Any) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


@native
@pytest.mark.parametrize(("sql", "values"), FAILURES, ids=lambda x: str(x)[:30])
def test_a_failure_raises_what_the_sqlite3_module_raises(
    writer: WriterConnection, sql: str, values: list[Any]
) -> None:
    plain = sqlite3.connect(":memory:")
    for conn in (plain, writer):
        conn.execute("DROP TABLE IF EXISTS t")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT NOT NULL)")
        conn.execute("INSERT INTO t (k, v, n) VALUES ('dup', 0, 'x')")
    theirs = _raised(lambda: plain.execute(sql, values))
    ours = _raised(lambda: execute_rows(writer, sql, values, 0, 1, len(values)))
    assert type(ours) is type(theirs)
    assert str(ours) == str(theirs)
    for attribute in ("sqlite_errorcode", "sqlite_errorname"):
        assert getattr(ours, attribute, None) == getattr(theirs, attribute, None)
    # Nothing of the failed statement stayed, and the statement can run again.
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (1,)
    execute_rows(writer, "INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["new", 1, "x"], 0, 1, 3)


@native
def test_begin_and_commit_run_as_the_sqlite3_module_runs_them(writer: WriterConnection) -> None:
    execute(writer, "BEGIN IMMEDIATE")
    assert writer.in_transaction
    execute_rows(writer, "INSERT INTO t (k, v, n) VALUES (?, ?, ?)", ["a", 1, "x"], 0, 1, 3)
    execute(writer, "COMMIT")
    assert not writer.in_transaction
    with pytest.raises(sqlite3.OperationalError, match="no transaction is active") as info:
        execute(writer, "COMMIT")
    assert info.value.sqlite_errorname == "SQLITE_ERROR"  # type: ignore[attr-defined]


@native
def test_a_closed_connection_is_refused_as_the_sqlite3_module_refuses_it(
    tmp_path: Path,
) -> None:
    conn = open_writer(tmp_path / "w.sqlite3")
    conn.execute("CREATE TABLE t (k)")
    execute_rows(conn, "INSERT INTO t (k) VALUES (?)", [1], 0, 1, 1)
    conn.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        execute_rows(conn, "INSERT INTO t (k) VALUES (?)", [1], 0, 1, 1)


@native
def test_closing_with_statements_prepared_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    conn = open_writer(path)
    conn.execute("CREATE TABLE t (k)")
    for n in range(1, 4):
        execute_rows(conn, "INSERT INTO t (k) VALUES " + ",".join(["(?)"] * n), [1] * n, 0, n, 1)
    conn.close()
    # The last connection to close checkpoints and deletes the WAL: the handle is gone,
    # not left open for statements that outlived it.
    assert not Path(f"{path}-wal").exists()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone() == (6,)


@native
def test_a_statement_runs_on_its_own_connection_only(
    writer: WriterConnection, tmp_path: Path
) -> None:
    other = open_writer(tmp_path / "other.sqlite3")
    other.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT NOT NULL)")
    sql = "INSERT INTO t (k, v, n) VALUES (?, ?, ?)"
    execute_rows(writer, sql, ["a", 1, "x"], 0, 1, 3)
    assert writer.statements is not None
    statement = writer.statements[sql]
    with pytest.raises(ValueError, match="another connection"):
        statement.run(other, ["b", 1, "x"], 0, 1, 3)
    with pytest.raises(ValueError, match="do not fit"):
        statement.run(writer, ["b", 1, "x"], 1, 1, 3)
    other.close()


@native
def test_the_statements_kept_are_bounded(writer: WriterConnection) -> None:
    for n in range(1, STATEMENTS_KEPT + 21):
        sql = f"INSERT OR IGNORE INTO t (k, v, n) VALUES (?, {n}, ?)"
        execute_rows(writer, sql, ["a", "x"], 0, 1, 2)
    assert writer.statements is not None
    assert len(writer.statements) == STATEMENTS_KEPT
    assert "VALUES (?, 1, ?)" not in next(iter(writer.statements))  # the oldest went first


# -- the relay-wal VFS ------------------------------------------------------------------


def _write_calls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


def _commit_rows(conn: sqlite3.Connection, count: int, first: int = 0) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO t (k, v, n) VALUES (?, ?, ?)",
        [(f"k{first + i}", i, "x" * 1000) for i in range(count)],
    )
    conn.execute("COMMIT")


@native
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_a_commit_writes_its_wal_in_a_few_calls(tmp_path: Path) -> None:
    calls = {}
    for name, conn in (
        ("default", sqlite3.connect(tmp_path / "d.sqlite3", isolation_level=None)),
        ("relay-wal", open_writer(tmp_path / "w.sqlite3")),
    ):
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT)")
        before = _write_calls()
        _commit_rows(conn, 300)  # ~80 pages: 160 write calls through the default VFS
        calls[name] = _write_calls() - before
        conn.close()
    assert calls["default"] >= 150
    assert calls["relay-wal"] <= calls["default"] / 10, calls


@native
def test_every_committed_row_is_readable_at_once_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    conn = open_writer(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT)")
    reader = sqlite3.connect(path)
    for round_no in range(5):
        _commit_rows(conn, 200, first=round_no * 200)
        count = (round_no + 1) * 200
        assert reader.execute("SELECT count(*), sum(length(n)) FROM t").fetchone() == (
            count,
            count * 1000,
        )
        # Another process, through the default VFS, before any checkpoint.
        out = subprocess.run(
            [sys.executable, "-c", _COUNT, str(path)], capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == [str(count), "ok"]
    conn.close()


_COUNT = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1])
    print(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    print(conn.execute("PRAGMA integrity_check").fetchone()[0])
    """
)


@native
@pytest.mark.parametrize("level", ["NORMAL", "OFF", "0", "1", "yes", "'normal'"])
def test_the_vfs_refuses_commits_without_a_sync(writer: WriterConnection, level: str) -> None:
    with pytest.raises(sqlite3.OperationalError, match="needs synchronous=FULL or EXTRA"):
        writer.execute(f"PRAGMA synchronous = {level}")
    assert writer.execute("PRAGMA synchronous").fetchone() == (2,)


@native
@pytest.mark.parametrize(("level", "value"), [("FULL", 2), ("extra", 3), ("2", 2), ("3", 3)])
def test_the_vfs_takes_every_level_that_syncs_each_commit(
    writer: WriterConnection, level: str, value: int
) -> None:
    writer.execute(f"PRAGMA synchronous = {level}")
    assert writer.execute("PRAGMA synchronous").fetchone() == (value,)


@native
@pytest.mark.parametrize("rows", [60, 200])
def test_frames_a_rollback_abandoned_never_overwrite_another_writers_commit(
    tmp_path: Path, rows: int
) -> None:
    # A transaction bigger than its page cache spills frames to the WAL before any
    # COMMIT; rolled back, it leaves them past the last commit, and the next writer
    # (here another connection, as the CLI would be) writes its own commit at the same
    # offsets. Frames still in the buffer then must not be written over it later.
    path = tmp_path / "w.sqlite3"
    writer = open_writer(path)
    writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT)")
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next frames start the WAL
    writer.execute("PRAGMA cache_size = 10")
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany(
        "INSERT INTO t (k, v, n) VALUES (?, ?, ?)",
        [(f"u{i}", i, "y" * 1000) for i in range(rows)],
    )
    writer.execute("ROLLBACK")
    other = sqlite3.connect(path, isolation_level=None)
    _commit_rows(other, 50, first=1000)
    other.close()
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (50,)
    _commit_rows(writer, 1, first=0)
    writer.close()
    fresh = sqlite3.connect(path)
    assert fresh.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert fresh.execute("SELECT count(*), sum(n = ?) FROM t", ["x" * 1000]).fetchone() == (51, 51)


_KILLED = textwrap.dedent(
    """
    import os, signal, sqlite3, sys
    from relay.outbox.connection import WriterConnection, writer_database
    database, uri = writer_database(sys.argv[1])
    conn = sqlite3.connect(database, uri=uri, factory=WriterConnection, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v, n TEXT)")
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO t (k, v, n) VALUES (?, ?, ?)", [(f"k{i}", i, "x" * 1000) for i in range(300)]
    )
    conn.execute("COMMIT")
    if sys.argv[2] == "open":
        # A transaction bigger than the page cache, so that SQLite spills its pages to
        # the WAL before any COMMIT; the last of them are still in the buffer.
        conn.execute("PRAGMA cache_size = 10")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO t (k, v, n) VALUES (?, ?, ?)",
            [(f"u{i}", i, "y" * 1000) for i in range(2000)],
        )
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@native
@pytest.mark.parametrize("when", ["committed", "open"])
def test_a_kill_leaves_every_commit_and_nothing_else(tmp_path: Path, when: str) -> None:
    path = tmp_path / "w.sqlite3"
    done = subprocess.run([sys.executable, "-c", _KILLED, str(path), when], check=False)
    assert done.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT count(*), min(k), max(k) FROM t").fetchone() == (300, "k0", "k99")


# -- the writer on the sqlite3 module alone ----------------------------------------------


async def test_the_outbox_stores_the_same_rows_without_the_compiled_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = {}
    for name in ("native", "python"):
        if name == "python":
            monkeypatch.setattr(connection, "UNLINKED", "taken away by the test")
        box = await Outbox.open(tmp_path / f"{name}.sqlite3")
        try:
            assert isinstance(box._conn._conn, WriterConnection)
            assert (box._conn._conn.statements is None) == (connection.UNLINKED is not None)
            body = batch(
                ("1111111", [position(format_ms(NOW_MS - 300_000 + s)) for s in range(300)])
            )
            first = await store(box, body)
            again = await store(box, body)
            assert (first.accepted, again.duplicates) == (300, 300)
        finally:
            await box.close()
        conn = sqlite3.connect(tmp_path / f"{name}.sqlite3")
        tables[name] = conn.execute(
            "SELECT provider_event_id, vehicle_id, event_ts, event_type, status, payload,"
            " source FROM positions ORDER BY id"
        ).fetchall()
    assert tables["native"] == tables["python"]
    assert len(tables["native"]) == 300
