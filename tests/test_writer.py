"""The group writer: its own thread, group commit, and every caller answered after its COMMIT."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW_MS, batch, position
from outbox_helpers import big_batch, in_one_group, statements, store, table, ts, types
from structlog.testing import capture_logs

from relay.outbox import writer
from relay.outbox.storage import Outbox, StoreResult
from relay.timeutil import format_ms

# -- the thread ------------------------------------------------------------------------


async def test_a_write_starts_without_waiting_for_the_event_loop(
    outbox: Outbox, db_path: Path
) -> None:
    # The writer's thread is woken directly, not through a task on the loop: the loop
    # may be busy parsing the next requests (here: blocked outright) while the writer
    # already commits. A worker restarted through the loop would wait for it.
    await outbox._write(lambda conn: None)  # the thread exists and sits idle
    ran = threading.Event()

    def job(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO relay_state (key, value, updated_at) VALUES ('k', 'v', 'x')")
        ran.set()

    task = asyncio.ensure_future(outbox._write(job))
    await asyncio.sleep(0)  # write() queues the job and wakes the thread
    assert ran.wait(10)  # the loop is blocked here, the thread ran the job anyway
    await task
    assert table(db_path, "SELECT key FROM relay_state") == [("k",)]


async def test_one_thread_serves_every_group(outbox: Outbox) -> None:
    names = await asyncio.gather(
        *(outbox._write(lambda conn: threading.current_thread().name) for _ in range(5))
    )
    names += [await outbox._write(lambda conn: threading.current_thread().name)]
    assert set(names) == {"outbox-writer"}
    assert [t.name for t in threading.enumerate()].count("outbox-writer") == 1


async def test_close_finishes_queued_writes_then_refuses_new_ones(db_path: Path) -> None:
    box = await Outbox.open(db_path)
    pending = [
        asyncio.ensure_future(store(box, batch(("9876543", [position(ts(s))])))) for s in range(3)
    ]
    await asyncio.sleep(0)  # queued
    await box.close()
    assert [(await p).accepted for p in pending] == [1, 1, 1]
    assert not any(t.name == "outbox-writer" for t in threading.enumerate())
    with pytest.raises(writer.WriterStopped, match="closed"):
        await box._write(lambda conn: None)
    assert table(db_path, "SELECT count(*) FROM positions") == [(3,)]


async def test_counts_do_not_wait_for_a_write_in_progress(outbox: Outbox) -> None:
    await store(outbox, batch(("9876543", [position(ts(1))])))
    started, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO relay_state (key, value, updated_at) VALUES ('k', 'v', 'x')")
        started.set()
        release.wait(10)

    holder = asyncio.ensure_future(outbox._write(slow))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        # Committed rows only, read beside the open transaction.
        async with asyncio.timeout(5):
            assert await outbox.counts() == {"pending": 1, "held": 0, "sent": 0, "failed": 0}
    finally:
        release.set()
        await holder


class Crash(BaseException):
    """Nothing in the writer catches this: it ends the thread."""


async def test_a_dead_writer_thread_fails_its_callers_and_every_later_write(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(conn: Any, jobs: Any, listener: Any) -> Any:
        raise Crash("bug")

    watching = asyncio.ensure_future(outbox.watch_writer())  # what the daemon supervises
    monkeypatch.setattr(writer, "run_group", crash)
    with capture_logs() as logs, pytest.raises(Crash):
        await asyncio.wait_for(outbox._write(lambda conn: None), 10)
    assert [e["event"] for e in logs] == ["outbox_writer_died"]
    assert logs[0]["error"] == "Crash: bug"
    with pytest.raises(Crash):
        await asyncio.wait_for(watching, 10)
    with pytest.raises(writer.WriterStopped, match="died") as stopped:
        await outbox._write(lambda conn: None)
    assert isinstance(stopped.value.__cause__, Crash)


async def test_the_watch_waits_while_the_writer_lives(outbox: Outbox) -> None:
    watching = asyncio.ensure_future(outbox.watch_writer())
    await outbox._write(lambda conn: None)
    await outbox._write(lambda conn: None)
    assert not watching.done()
    watching.cancel()


# -- group commit ----------------------------------------------------------------------


async def test_concurrent_batches_share_one_commit(outbox: Outbox, db_path: Path) -> None:
    bodies = [
        batch((vid, [position(ts(s), ignition=s % 2 == 0) for s in range(10)]))
        for vid in ("9876543", "1111111", "5555555")
    ]
    results, seen = await in_one_group(outbox, *(store(outbox, body) for body in bodies))
    # One transaction, one fsync, for all three requests; each still gets its own answer.
    assert seen.count("COMMIT") == 1
    assert [(r.accepted, r.held) for r in results] == [(10, 0), (10, 0), (10, 10)]
    assert results[0].vehicles == frozenset({"9876543"})
    assert table(db_path, "SELECT count(*) FROM positions") == [(30,)]
    # Event types are decided per vehicle inside the transaction, as one at a time would.
    assert types(db_path, "1111111")[:3] == [
        (ts(0), "PERIODIC"),
        (ts(1), "IGNITION_OFF"),
        (ts(2), "IGNITION_ON"),
    ]


async def test_a_group_takes_a_handful_of_statements_whatever_its_size(outbox: Outbox) -> None:
    # The writer runs in its own thread, where every SQLite step hands the GIL to the
    # busy event loop and back: one statement per row, or even per request, would
    # stall it (bench.findings). Three requests committed together:
    bodies = [
        big_batch(400),  # 401 rows (one held) and a quarantined entry
        batch(("1111111", [position(format_ms(NOW_MS - 120_000 + s)) for s in range(300)])),
        batch(("9876543", [position(format_ms(NOW_MS - 60_000 + s)) for s in range(400)])),
    ]
    results, seen = await in_one_group(outbox, *(store(outbox, body) for body in bodies))
    assert [(r.accepted, r.held, r.quarantined) for r in results] == [
        (401, 1, 1),
        (300, 0, 0),
        (400, 0, 0),
    ]
    assert [s.split(" (")[0].split(" VALUES")[0] for s in seen] == [
        "BEGIN IMMEDIATE",
        "PRAGMA data_version",  # the states of vehicles seen before are kept (test_states)
        "SELECT json_group_array(json_array(vehicle_id, last_ts, ignition)) FROM vehicle_state"
        " WHERE vehicle_id IN",
        "INSERT OR IGNORE INTO positions",  # rows 1-500 of the 1,101
        "INSERT OR IGNORE INTO positions",  # 501-1000
        "INSERT OR IGNORE INTO positions",  # 1001-1101
        "INSERT OR IGNORE INTO quarantine",
        "INSERT INTO vehicle_state",
        "COMMIT",
    ]


async def test_a_resent_batch_in_a_group_is_counted_request_by_request(
    outbox: Outbox, db_path: Path
) -> None:
    # Taken together, per-request counts assume every row is new; a duplicate in the
    # group sends each request through on its own, with its own counts.
    await store(outbox, batch(("9876543", [position(ts(1))])))
    (first, again, other), seen = await in_one_group(
        outbox,
        store(outbox, batch(("9876543", [position(ts(2)), position(ts(3))]))),
        store(outbox, batch(("9876543", [position(ts(1)), position(ts(2))]))),
        store(outbox, batch(("1111111", [position(ts(1))]))),
    )
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert (other.accepted, other.duplicates) == (1, 0)
    assert seen.count("COMMIT") == 1
    assert seen.count("ROLLBACK") == 1  # the group's attempt, then one request at a time
    assert seen.count("SAVEPOINT job") == 3
    assert table(db_path, "SELECT count(*) FROM positions") == [(4,)]


async def test_event_types_carry_across_the_requests_of_a_group(
    outbox: Outbox, db_path: Path
) -> None:
    await store(outbox, batch(("1111111", [position(ts(0), ignition=False)])))
    _, seen = await in_one_group(
        outbox,
        store(outbox, batch(("1111111", [position(ts(1), ignition=True)]))),
        store(outbox, batch(("1111111", [position(ts(2), ignition=True)]))),
        store(outbox, batch(("1111111", [position(ts(3), ignition=False)]))),
    )
    assert seen.count("COMMIT") == 1
    assert "ROLLBACK" not in seen  # taken together
    assert types(db_path, "1111111") == [
        (ts(0), "PERIODIC"),
        (ts(1), "IGNITION_ON"),
        (ts(2), "PERIODIC"),
        (ts(3), "IGNITION_OFF"),
    ]
    assert table(db_path, "SELECT last_ts, ignition FROM vehicle_state") == [(ts(3), 0)]


async def test_a_writer_that_cannot_run_answers_its_callers_and_the_next(
    outbox: Outbox,
) -> None:
    # Not a job failing (that rolls back alone) but the group itself: here the
    # connection is gone. Every caller gets the error instead of waiting forever.
    outbox._conn._conn.close()
    for _ in range(2):
        with pytest.raises(sqlite3.ProgrammingError):
            await asyncio.wait_for(store(outbox, batch(("9876543", [position(ts(1))]))), 10)


async def test_checkpoints_run_beside_the_writer_and_keep_the_wal_small(
    outbox: Outbox, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "CHECKPOINT_CHANGES", 100)
    # Without the writer's own autocheckpoint, only the background one can stop the
    # -wal file from growing with every batch.
    await outbox._conn.execute("PRAGMA wal_autocheckpoint = 0")
    seen = statements(outbox)
    for n in range(40):
        stamps = [format_ms(NOW_MS - 3_600_000 + (n * 100 + i) * 1000) for i in range(100)]
        await store(outbox, batch(("9876543", [position(s) for s in stamps])))
        if outbox._group.checkpoint is not None:
            await outbox._group.checkpoint  # deterministic: each one finishes before the next batch
    assert not any("checkpoint" in s for s in seen)  # never in the writer's commits
    assert table(db_path, "SELECT count(*) FROM positions") == [(4000,)]
    wal = db_path.with_name(db_path.name + "-wal")
    # 4,000 rows are ~5 MB of pages; checkpointed and restarted, the WAL holds ~2 batches.
    assert wal.stat().st_size < 1_000_000, wal.stat().st_size


async def test_under_steady_writes_the_writers_own_checkpoint_bounds_the_wal(
    outbox: Outbox, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With groups back to back, a checkpoint beside the writer never copies the last
    # frame before the next COMMIT appends more, so it never lets the WAL start over;
    # the writer's own, in the COMMIT that finds the WAL past its limit, does
    # (WRITER_AUTOCHECKPOINT_PAGES). Here that limit is 200 pages and ~6,000 pages go
    # through the WAL while checkpoints run beside the writer all along.
    monkeypatch.setattr(writer, "CHECKPOINT_CHANGES", 100)
    await outbox._conn.execute("PRAGMA wal_autocheckpoint = 200")

    async def sender(vehicle: str) -> None:
        for n in range(40):
            stamps = [format_ms(NOW_MS - 3_600_000 + (n * 100 + i) * 1000) for i in range(100)]
            await store(outbox, batch((vehicle, [position(s) for s in stamps])))

    await asyncio.gather(*(sender(f"80000{k:02d}") for k in range(4)))
    assert table(db_path, "SELECT count(*) FROM positions") == [(16_000,)]
    wal = db_path.with_name(db_path.name + "-wal")
    # The limit plus the groups committed while a checkpoint ran: a few hundred pages.
    assert wal.stat().st_size < 1_000 * 4096, wal.stat().st_size


async def test_a_failing_write_fails_alone_in_its_group(outbox: Outbox, db_path: Path) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO relay_state (key, value, updated_at) VALUES ('half', 'done', 'x')"
        )
        raise ValueError("bug after a write")

    (first, failed, last), seen = await in_one_group(
        outbox,
        store(outbox, batch(("9876543", [position(ts(1))]))),
        outbox._write(broken),
        store(outbox, batch(("1111111", [position(ts(2))]))),
        return_exceptions=True,
    )
    assert seen.count("COMMIT") == 1
    assert isinstance(failed, ValueError)
    assert isinstance(first, StoreResult)
    assert first.accepted == 1
    assert isinstance(last, StoreResult)
    assert last.accepted == 1
    # Its savepoint was rolled back: nothing of the failed write, all of the others.
    assert table(db_path, "SELECT key FROM relay_state") == []
    assert table(db_path, "SELECT vehicle_id FROM positions ORDER BY 1") == [
        ("1111111",),
        ("9876543",),
    ]


async def test_a_caller_cancelled_before_its_turn_writes_nothing(
    outbox: Outbox, db_path: Path
) -> None:
    # The writer's thread is held inside a first job while the second one waits.
    started, gate = threading.Event(), threading.Event()

    def blocking(conn: sqlite3.Connection) -> None:
        started.set()
        gate.wait(10)

    blocker = asyncio.ensure_future(outbox._write(blocking))
    assert await asyncio.to_thread(started.wait, 10)
    task = asyncio.ensure_future(store(outbox, batch(("9876543", [position(ts(1))]))))
    await asyncio.sleep(0)  # queued behind the blocker
    task.cancel()
    gate.set()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await task
    assert table(db_path, "SELECT count(*) FROM positions") == [(0,)]
    # The writer carries on with later work.
    assert (await store(outbox, batch(("9876543", [position(ts(2))])))).accepted == 1


async def test_a_failed_commit_fails_every_caller_of_the_group(
    outbox: Outbox, db_path: Path
) -> None:
    # The outbox's connection may not grow the file: SQLite's real "disk full".
    await outbox._conn.execute("PRAGMA max_page_count = 1")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        await store(outbox, big_batch(50))
    await outbox._conn.execute("PRAGMA max_page_count = 1073741823")
    assert table(db_path, "SELECT count(*) FROM positions") == [(0,)]
    assert (await store(outbox, big_batch(50))).accepted == 51


# -- statement sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size"),
    [(1, 1), (3, 4), (17, 32), (64, 64), (65, 100), (101, 150), (499, 500), (500, 500)],
)
def test_padded_size(count: int, size: int) -> None:
    assert writer.padded_size(count) == size


def test_a_padded_in_list_has_the_same_items() -> None:
    for n in range(1, 501):
        padded = writer.padded_in(list(range(n)))
        assert len(padded) == writer.padded_size(n)
        assert set(padded) == set(range(n))


class Recorder:
    """A connection that records the statement texts it is asked to run."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.texts: list[str] = []

    @property
    def total_changes(self) -> int:
        return self.conn.total_changes

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self.texts.append(sql)
        return self.conn.execute(sql, params)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k TEXT NOT NULL UNIQUE, v INTEGER)")
    yield Recorder(conn)
    conn.close()  # Python 3.13 warns about a connection left open, and warnings are errors


def test_inserts_of_any_size_store_exactly_their_rows_with_a_few_statement_texts(
    recorder: Recorder,
) -> None:
    # Every size from 1 to 501 rows, and two that take several statements: unpadded,
    # each size would be a statement of its own for SQLite to prepare.
    template = "INSERT OR IGNORE INTO t (k, v) VALUES {rows}"
    stored = 0
    for n in [*range(1, 502), 999, 1200]:
        rows = [(f"{n}:{i}", i) for i in range(n)]
        assert writer.insert_rows(recorder, template, rows) == n
        stored += n
    assert recorder.conn.execute("SELECT count(*), sum(v) FROM t").fetchone() == (
        stored,
        sum(i * (i - 1) // 2 for i in [*range(1, 502), 999, 1200]),
    )
    assert len(set(recorder.texts)) == len(writer.SIZES)
    # Rows stored already still count as not changed, whatever the padding copies.
    assert writer.insert_rows(recorder, template, [("1:0", 0), ("new", 1), ("2:1", 1)]) == 1


def test_only_insert_or_ignore_is_padded(recorder: Recorder) -> None:
    # A copy of a row would fail a plain INSERT, and be counted twice by an upsert.
    rows = [("a", 1), ("b", 2), ("c", 3)]
    assert writer.insert_rows(recorder, "INSERT INTO t (k, v) VALUES {rows}", rows) == 3
    assert recorder.texts == ["INSERT INTO t (k, v) VALUES (?,?),(?,?),(?,?)"]
