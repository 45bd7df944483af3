"""Group commit: many callers, one writer connection, one thread.

Writes are *jobs* (plain functions of a ``sqlite3.Connection``). Jobs that arrive while
a commit is on its way to disk wait, and then go in together: one ``BEGIN IMMEDIATE``,
the jobs, one ``COMMIT`` (one fsync) for all of them. Every caller still gets its
answer only after that COMMIT, so a webhook's 200 still means its rows are on disk; a
job that fails undoes its own writes only (see run_group).

The jobs and the COMMIT run in the writer's own thread, group after group, so SQLite
works beside the event loop while the loop parses the next requests. Every statement
there hands the GIL over and must win it back from the loop, so jobs use a handful of
multi-row statements (insert_rows), never one per row: measured, executemany from a
thread beside a saturated loop is 9-46x slower than one multi-row INSERT
(bench.findings). Those statements, BEGIN and COMMIT go through the writer's own
connection (relay.outbox.connection), which runs them in C and writes each commit's
WAL in one go where relay/_sqlrun.c was built.

WAL checkpoints run on a connection of their own beside the writer, not inside its
COMMIT where every waiting webhook would wait for them too.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiosqlite
import structlog

from relay.outbox.connection import execute, execute_rows

T = TypeVar("T")
log = structlog.get_logger("relay.outbox")

# A checkpoint beside the writer after this many changed rows (~2,500 pages, ~10 MB of
# WAL); the writer checkpoints in its COMMIT only past WRITER_AUTOCHECKPOINT_PAGES. A
# COMMIT that runs beside a checkpoint takes about twice as long, so fewer, larger
# ones: against 2,000
# rows, alternating (23 Nov), 8 senders 74.0-77.3k against 64.7-73.9k positions/s (5
# of 5 pairs; ack p99 27-31 against 21-22 ms), 32 senders +4-6% (3 of 3), forwarding
# 2-6% less CPU per event; 10,000 rows measured the same as 5,000.
CHECKPOINT_CHANGES = 5000
# ... but under a steady stream of groups those checkpoints never finish the WAL: each
# copies the frames there were when it began while the writer appends more, and SQLite
# starts the WAL over only once every frame is in the database. So it is the writer's
# own checkpoint, in the COMMIT that finds the WAL past this many pages, that lets the
# WAL start over, and that COMMIT holds up every webhook waiting on the group: traced
# at 8 senders, with 8,000 pages one COMMIT in ~60 took 15-55 ms (every ~0.45 s, 30
# MB of WAL); with 2,000, 12-18 ms every ~0.14 s (the checkpoints beside the writer
# had copied most of it). Alternating (23 Nov, 6 runs each at 8 senders, 4 at 32):
# ack p99 39.9 against 49.2 ms (max 43.0 against 56.0), 50.1k against 49.1k
# positions/s; 32 senders 58.0k against 57.3k, p99 87.9 against 93.6 ms. 1,000 pages
# was slower (47.0k); 2,000 with CHECKPOINT_CHANGES 2,000 had p99 34 ms but 6% less
# at 32 senders.
WRITER_AUTOCHECKPOINT_PAGES = 2000
# Bound on the rows per multi-row statement (x 10 columns: within SQLite's 32,766
# variables); 500 keeps every Frotcom batch of usual size to one statement.
ROWS_PER_STATEMENT = 500
# Statement sizes: an INSERT OR IGNORE (and an IN list) is padded up to the next of
# these, so that whatever the batch sizes a few dozen statement texts are prepared
# once and reused from the connection's cache. Preparing a positions INSERT costs
# ~3.1-3.5 us per row, about what inserting the row does.
SIZES = (1, 2, 4, 8, 16, 32, 64, 100, 150, 200, 250, 300, 350, 400, 450, 500)


@dataclass(eq=False, slots=True)
class Job:
    work: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


class TransactionListener(Protocol):
    """Told, in the writer's thread, how each of its transactions ended.

    For caches of what the writer wrote (``relay.outbox.states``): what a job wrote is
    known to be stored only after ``committed``.
    """

    def committed(self) -> None: ...

    def rolled_back(self) -> None: ...


class TransactionLost(Exception):
    """SQLite rolled the whole transaction back on its own (I/O error, disk full)."""


class Uncombinable(Exception):
    """Raised by a ``combine`` that cannot answer for its jobs together: run them alone."""


class WriterStopped(sqlite3.ProgrammingError):
    """A write after ``close()``, or after the writer's thread died (the cause is chained)."""


class GroupWriter:
    """Runs jobs on ``conn`` in group transactions, in a thread of its own.

    The thread lives as long as the writer: a job queued while it is idle wakes it
    directly (a condition variable), not through a task on the event loop. Restarting
    a worker through the loop put it behind every callback already queued there: with
    8 requests in flight the writer sat idle 32% of the time while the loop parsed the
    next 8, then wrote all 8 while the loop sat idle (in-process, 8 senders, no HTTP:
    66-71k positions/s with the worker restarted through the loop, 79-83k with the
    thread woken directly; writer busy 68% against 96%).
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        checkpointer: sqlite3.Connection,
        listener: TransactionListener | None = None,
    ) -> None:
        self.conn = conn
        self._listener = listener
        self.checkpoint: asyncio.Future[None] | None = None
        self._checkpointer = checkpointer
        self._changes_since_checkpoint = 0
        self._queue: collections.deque[Job] = collections.deque()
        # Guards the queue and the fields below; the thread waits on it when idle.
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._died: BaseException | None = None
        self._death: asyncio.Future[None] | None = None

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in a write transaction; returns once that transaction committed."""
        loop = asyncio.get_running_loop()
        job = Job(work, loop.create_future())
        with self._wakeup:
            if self._died is not None:
                raise WriterStopped("the outbox writer's thread died") from self._died
            if self._stopping:
                raise WriterStopped("the outbox is closed")
            if self._thread is None:
                self._loop = loop
                self._thread = threading.Thread(
                    target=self._run, args=(loop,), name="outbox-writer", daemon=True
                )
                self._thread.start()
            elif loop is not self._loop:
                raise RuntimeError("an outbox writer serves the event loop that first used it")
            self._queue.append(job)
            self._wakeup.notify()
        result: T = await job.future
        return result

    async def watch(self) -> None:
        """Return never while the writer's thread lives; raise what killed it.

        The daemon runs this as a supervised task, so that a dead writer stops the
        service loudly instead of answering every write with an error.
        """
        if self._death is None:
            self._death = asyncio.get_running_loop().create_future()
            with self._wakeup:
                died = self._died
            if died is not None:
                self._death.set_exception(died)
        await self._death

    def _mark_dead(self, exc: BaseException) -> None:
        if self._death is not None and not self._death.done():
            self._death.set_exception(exc)

    async def close(self) -> None:
        """Finish the queued jobs and a running checkpoint, stop the thread, close up."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            # The thread hands its last outcomes to the loop before it ends, so they
            # are settled before this join's own result comes back.
            await asyncio.to_thread(thread.join)
        if self.checkpoint is not None:
            await asyncio.gather(self.checkpoint, return_exceptions=True)
        self._checkpointer.close()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """The thread: group after group while jobs wait, asleep while none do.

        Outcomes go back to the loop with call_soon_threadsafe. A thread that died here
        would leave every caller waiting forever, so anything escaping a group fails the
        jobs queued and every later write, loudly.
        """
        conn = self.conn._conn
        jobs: list[Job] = []
        try:
            while True:
                with self._wakeup:
                    while not self._queue and not self._stopping:
                        self._wakeup.wait()
                    if not self._queue:
                        return  # closing, and nothing left to write
                    jobs = list(self._queue)
                    self._queue.clear()
                try:
                    outcomes, retry, changes = run_group(conn, jobs, self._listener)
                except Exception as exc:  # a bug, or the connection closed under us
                    outcomes, retry, changes = [(job, exc) for job in jobs], [], 0
                if retry:
                    with self._wakeup:
                        self._queue.extendleft(reversed(retry))
                self._hand_back(loop, outcomes, changes)
                # Let go of the group at once: whoever drops the last reference frees
                # the jobs' rows (thousands of objects a group), and that should be the
                # loop once each caller is answered, not this thread at the start of its
                # next group, where every waiting webhook would wait for it.
                jobs = []
                del outcomes, retry
        except BaseException as exc:
            # Not re-raised: the callers, every later write and watch() hear of it
            # instead; the daemon supervises watch(), so it stops.
            log.critical("outbox_writer_died", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            with self._wakeup:
                self._died = exc
                orphans = list(self._queue)
                self._queue.clear()
            self._hand_back(loop, [(job, exc) for job in jobs + orphans], 0)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._mark_dead, exc)

    def _hand_back(
        self, loop: asyncio.AbstractEventLoop, outcomes: list[tuple[Job, Any]], changes: int
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(self._group_done, outcomes, changes)

    def _group_done(self, outcomes: list[tuple[Job, Any]], changes: int) -> None:
        settle(outcomes)
        self._changes_since_checkpoint += changes
        if self._changes_since_checkpoint >= CHECKPOINT_CHANGES and (
            self.checkpoint is None or self.checkpoint.done()
        ):
            self._changes_since_checkpoint = 0
            self.checkpoint = asyncio.ensure_future(
                asyncio.to_thread(checkpoint, self._checkpointer)
            )


def run_group(
    conn: sqlite3.Connection, jobs: Sequence[Job], listener: TransactionListener | None = None
) -> tuple[list[tuple[Job, Any]], list[Job], int]:
    """One transaction for a group of jobs, in the writer's thread.

    Returns each job's outcome (its result or the exception it raised, to settle on the
    loop), the jobs to queue again because SQLite lost the transaction before them, and
    the rows the group changed.

    First all jobs in a row: each statement hands the GIL over, so the common case
    pays no savepoint at all, and jobs whose ``work`` has a ``combine`` (webhook
    batches) go in together through it. If any job raises, the transaction is rolled
    back and begun again, and every job runs alone in its own savepoint, so a failing
    job undoes its own writes only. Jobs are functions of the database, so running one
    twice gives the answer it would have given once.

    ``listener`` hears ``committed`` after the COMMIT, ``rolled_back`` after any
    transaction begun here did not commit (or may not have).
    """
    live = [job for job in jobs if not job.future.done()]  # done: the caller is gone
    if not live:
        return [], [], 0
    before = conn.total_changes
    try:
        execute(conn, "BEGIN IMMEDIATE")
    except Exception as exc:
        return [(job, exc) for job in live], [], 0
    committed = False
    outcomes: list[tuple[Job, Any]] = []
    try:
        n = 0
        while n < len(live):
            # A run of jobs of one kind that can be combined (webhook batches) goes in
            # as one; any other job runs alone.
            combine = getattr(live[n].work, "combine", None)
            end = n + 1
            while combine is not None and end < len(live):
                if getattr(live[end].work, "combine", None) is not combine:
                    break
                end += 1
            try:
                if combine is None:
                    outcomes.append((live[n], live[n].work(conn)))
                else:
                    results = combine(conn, [job.work for job in live[n:end]])
                    outcomes += zip(live[n:end], results, strict=True)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk full):
                    # the jobs so far went with it; the rest try again.
                    return [(j, exc) for j in live[:end]], live[end:], 0
                outcomes = []
                break
            n = end
        if not outcomes:
            # Rare (a re-sent batch, a job's own error): start over, one
            # savepoint per job. A BEGIN that fails now answers every job below.
            conn.execute("ROLLBACK")
            if listener is not None:
                listener.rolled_back()
            conn.execute("BEGIN IMMEDIATE")
            for n, job in enumerate(live):
                outcome = run_job(conn, job.work)
                if isinstance(outcome, TransactionLost):
                    cause = outcome.__cause__ or outcome
                    lost = [(j, cause) for j, _ in outcomes] + [(job, cause)]
                    return lost, live[n + 1 :], 0
                outcomes.append((job, outcome))
        execute(conn, "COMMIT")
        committed = True
    except Exception as exc:
        # A failed COMMIT (disk full, I/O error) may already have rolled back.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return [(job, exc) for job in live], [], 0
    finally:
        if listener is not None:
            if committed:
                listener.committed()
            else:
                listener.rolled_back()
    return outcomes, [], conn.total_changes - before


def run_job(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], Any]) -> Any:
    """One job in its own savepoint: its failure undoes its writes only.

    Returns the job's result or the exception it raised; ``TransactionLost`` when
    SQLite rolled back the whole transaction.
    """
    conn.execute("SAVEPOINT job")
    try:
        result = work(conn)
    except Exception as exc:
        if not conn.in_transaction:
            lost = TransactionLost()
            lost.__cause__ = exc
            return lost
        try:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        except sqlite3.Error:
            lost = TransactionLost()
            lost.__cause__ = exc
            return lost
        return exc
    conn.execute("RELEASE job")
    return result


def settle(outcomes: Iterable[tuple[Job, Any]]) -> None:
    for job, outcome in outcomes:
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def checkpoint(conn: sqlite3.Connection) -> None:
    # PASSIVE: copies what it can without waiting for, or blocking, the writer.
    with contextlib.suppress(sqlite3.Error):  # the writer's own autocheckpoint remains
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


@functools.lru_cache(maxsize=256)
def _statement(template: str, width: int, rows: int) -> str:
    group = "(" + ",".join("?" * width) + ")"
    return template.format(rows=",".join([group] * rows))


def insert_rows(conn: sqlite3.Connection, template: str, rows: Sequence[Sequence[Any]]) -> int:
    """Insert ``rows`` with one multi-row statement per 500; returns the rows changed.

    ``template`` has ``{rows}`` where the row groups go, after VALUES. executemany
    would step SQLite once per row, and from the writer's thread each step gives the
    GIL away and must win it back from a busy event loop.
    """
    if not rows:
        return 0
    return insert_flat(conn, template, len(rows[0]), list(itertools.chain.from_iterable(rows)))


def insert_flat(conn: sqlite3.Connection, template: str, width: int, values: list[Any]) -> int:
    """insert_rows for rows laid end to end, ``width`` values each (made off the writer).

    An INSERT OR IGNORE is padded to its statement size with copies of its first row:
    the first copy that is new goes in, the others conflict with it and are ignored,
    so the rows changed are the same.
    """
    before = conn.total_changes
    step = ROWS_PER_STATEMENT * width
    pad = template.startswith("INSERT OR IGNORE ")
    for start in range(0, len(values), step):
        rows = min(len(values) - start, step) // width
        size = padded_size(rows) if pad else rows
        execute_rows(conn, _statement(template, width, size), values, start, rows, width)
    return conn.total_changes - before


def padded_size(count: int) -> int:
    """The statement size ``count`` rows or IN-list items (1 to 500) are padded up to."""
    return SIZES[bisect.bisect_left(SIZES, count)]


def padded_in(items: Sequence[T]) -> list[T]:
    """An IN list padded to its statement size by repeating its last item: same answer."""
    return [*items, *itertools.repeat(items[-1], padded_size(len(items)) - len(items))]


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
