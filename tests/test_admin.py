"""Operator commands against real outboxes: what they report, what they change, how they query."""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import VIN, VIN2, batch, position, post_batch, rows, snapshot, wait_until

from relay import admin
from relay.admin import changes, common
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack
from relay.mapping import parse_batch
from relay.outbox.schema import connect, latest_version
from relay.outbox.storage import Outbox
from relay.timeutil import format_ms, parse_timestamp

A, B, UNMAPPED = "9876543", "1111111", "5555555"
MAPPED = {A: VIN, B: VIN2}
EVERYONE = {**MAPPED, UNMAPPED: "SALLAAAF4AA123456"}
T0 = parse_timestamp("2023-10-25T16:00:00Z")  # the first position of every vehicle
RECEIVED = T0 + 3_600_000
DAY_MS = 86_400_000


def at(ms: int) -> Callable[[], float]:
    return lambda: ms / 1000


def fleet(vehicles: dict[str, int], start_ms: int = T0) -> dict[str, Any]:
    """A Frotcom body: per vehicle, n positions one minute apart."""
    return batch(
        *[
            (vid, [position(ts=format_ms(start_ms + i * 60_000)) for i in range(n)])
            for vid, n in vehicles.items()
        ]
    )


async def store(
    outbox: Outbox, body: dict[str, Any], received_ms: int, vehicles: dict[str, str] = EVERYONE
) -> None:
    parsed = parse_batch(body, received_ms, DAY_MS)
    await outbox.store_batch(parsed, vehicles, "frotcom", received_ms)


def ids(db: Path, where: str = "1", params: tuple[Any, ...] = ()) -> list[int]:
    return [r["id"] for r in rows(db, where, params)]


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement the admin commands run, in order."""
    traced: list[str] = []
    real_connect = common.connect

    def connect(path: Path) -> sqlite3.Connection:
        conn = real_connect(path)
        conn.set_trace_callback(traced.append)
        return conn

    monkeypatch.setattr(common, "connect", connect)
    return traced


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(vehicles=MAPPED)


@pytest.fixture
async def outbox(config: Config) -> Any:
    box = await Outbox.open(config.outbox.path, clock=at(RECEIVED))
    try:
        yield box
    finally:
        await box.close()


# -- the operator's story, with the real daemon running ---------------------------------


async def test_requeue_while_the_daemon_runs_delivers_dead_letters(
    relay: TestClient, cartrack: FakeCartrack, make_config: Callable[..., Config]
) -> None:
    config = make_config(url=cartrack.url)
    db = config.outbox.path
    cartrack.set_default(lambda event: 422)
    status, _ = await post_batch(relay, fleet({A: 3}))
    assert status == 200
    await wait_until(lambda: len(rows(db, "status = 'failed'")) == 3)

    # In a thread, as the CLI is another process: blocking the daemon's event loop
    # could stall it inside a write transaction and make us wait for our own lock.
    report = await asyncio.to_thread(admin.status, config)
    assert report["counts"] == {"pending": 0, "held": 0, "sent": 0, "failed": 3}
    assert report["failed_by_status"] == [{"last_status": 422, "count": 3}]
    assert report["last_error"]["message"].startswith("HTTP 422")

    cartrack.set_default(None)
    assert (await asyncio.to_thread(admin.requeue, config)).total == 3
    await cartrack.wait_for(lambda fake: len(fake.accepted) == 3)
    await wait_until(lambda: len(rows(db, "status = 'sent'")) == 3)
    assert [e["event_ts"] for e in cartrack.accepted] == [
        format_ms(T0 + i * 60_000) for i in range(3)
    ]
    report = await asyncio.to_thread(admin.status, config)
    assert report["counts"] == {"pending": 0, "held": 0, "sent": 3, "failed": 0}


async def test_purge_while_the_daemon_runs(
    relay: TestClient, cartrack: FakeCartrack, make_config: Callable[..., Config]
) -> None:
    config = make_config(url=cartrack.url)
    await post_batch(relay, fleet({A: 4}))
    await wait_until(lambda: len(rows(config.outbox.path, "status = 'sent'")) == 4)
    assert await asyncio.to_thread(admin.purge, config, 0) == {"sent": 4, "quarantine": 0}
    # The daemon keeps storing and sending after the CLI deleted under it.
    status, _ = await post_batch(relay, fleet({B: 2}, start_ms=T0 + DAY_MS))
    assert status == 200
    await wait_until(lambda: len(rows(config.outbox.path, "status = 'sent'")) == 2)


# -- status ----------------------------------------------------------------------------


def test_status_of_an_empty_outbox(config: Config) -> None:
    connect(config.outbox.path, create=True).close()
    report = admin.status(config, clock=at(RECEIVED))
    assert report["counts"] == {"pending": 0, "held": 0, "sent": 0, "failed": 0}
    assert report["quarantine"] == 0
    assert report["oldest_pending"] is None
    assert report["held_vehicles"] == report["backlog_vehicles"] == []
    assert report["failed_by_status"] == []
    assert report["last_error"] is None
    assert report["schema_version"] == latest_version()
    assert report["path"] == str(config.outbox.path)
    assert report["size_bytes"] == config.outbox.path.stat().st_size > 0
    assert "oldest pending         none" in admin.render_status(report)


async def test_status_reports_backlog_held_failed_and_oldest(
    config: Config, outbox: Outbox
) -> None:
    db = config.outbox.path
    # 12 mapped vehicles with a backlog (vehicle i has i+1 rows), one unmapped vehicle.
    backlog = {f"70000{i:02d}": i + 1 for i in range(12)}
    await store(
        outbox, fleet(backlog), RECEIVED, vehicles={**EVERYONE, **dict.fromkeys(backlog, VIN)}
    )
    await store(outbox, fleet({A: 3, UNMAPPED: 2}, start_ms=T0 - 60_000), RECEIVED)
    await store(outbox, batch((B, [position(Latitude=91.0), position(ts="nonsense")])), RECEIVED)
    failed = ids(db, "vehicle_id = ?", (A,))
    outbox.clock = at(RECEIVED + 1_000)
    await outbox.mark_failed(failed[0], 422, "bad event")
    outbox.clock = at(RECEIVED + 2_000)
    await outbox.mark_failed(failed[1], None, "connection reset")
    outbox.clock = at(RECEIVED + 3_000)
    await outbox.mark_failed(failed[2], 422, "bad event")
    await outbox.hold_vehicle(UNMAPPED)
    # Vehicle 7000011's lane is retrying its first row; 7000010's lane is not.
    retrying = ids(db, "vehicle_id = '7000011'")[0]
    outbox.clock = at(RECEIVED + 4_000)
    await outbox.mark_retry(retrying, format_ms(RECEIVED + 64_000), 503, "busy,\n  retry")
    outbox.clock = at(RECEIVED + 5_000)
    await outbox.set_state("last_error", "HTTP 503: down\nfor maintenance")
    await outbox.set_state("forwarder_note", "paused: HTTP 401")

    now = RECEIVED + 90_000
    report = admin.status(config, clock=at(now))
    assert report["generated_at"] == format_ms(now)
    assert report["counts"] == {"pending": 78, "held": 2, "sent": 0, "failed": 3}
    assert report["quarantine"] == 2
    assert report["held_vehicles"] == [{"vehicle_id": UNMAPPED, "count": 2}]
    assert report["held_vehicle_count"] == 1
    assert report["pending_vehicle_count"] == 12
    assert [(e["vehicle_id"], e["count"]) for e in report["backlog_vehicles"]] == [
        (f"70000{i:02d}", i + 1) for i in range(11, 1, -1)
    ]
    assert report["backlog_vehicles"][:2] == [
        {
            "vehicle_id": "7000011",
            "count": 12,
            "oldest_event_ts": format_ms(T0),
            "oldest_age_seconds": (now - T0) / 1000,
            "attempts": 1,
            "next_attempt_at": format_ms(RECEIVED + 64_000),
            "last_status": 503,
            "last_error": "busy, retry",
        },
        {
            "vehicle_id": "7000010",
            "count": 11,
            "oldest_event_ts": format_ms(T0),
            "oldest_age_seconds": (now - T0) / 1000,
            "attempts": 0,
            "next_attempt_at": format_ms(RECEIVED),
            "last_status": None,
            "last_error": None,
        },
    ]
    assert report["failed_by_status"] == [
        {"last_status": 422, "count": 2},
        {"last_status": None, "count": 1},
    ]
    # Newest first: the retrying lane, then the dead letters.
    assert [
        (e["updated_at"], e["vehicle_id"], e["status"], e["last_status"], e["last_error"])
        for e in report["recent_errors"]
    ] == [
        (format_ms(RECEIVED + 4_000), "7000011", "pending", 503, "busy, retry"),
        (format_ms(RECEIVED + 3_000), A, "failed", 422, "bad event"),
        (format_ms(RECEIVED + 2_000), A, "failed", None, "connection reset"),
        (format_ms(RECEIVED + 1_000), A, "failed", 422, "bad event"),
    ]
    assert report["recent_errors"][0]["next_attempt_at"] == format_ms(RECEIVED + 64_000)
    assert report["last_error"] == {
        "message": "HTTP 503: down\nfor maintenance",
        "updated_at": format_ms(RECEIVED + 5_000),
    }
    assert report["relay_state"]["forwarder_note"] == {
        "value": "paused: HTTP 401",
        "updated_at": format_ms(RECEIVED + 5_000),
    }
    # The failed and held rows of T0 - 1 min do not count: only pending ones do.
    # 7000000 and 7000011 both start at T0: the first stored leads.
    assert report["oldest_pending"] == {
        "vehicle_id": "7000000",
        "event_ts": format_ms(T0),
        "received_at": format_ms(RECEIVED),
        "age_seconds": (now - T0) / 1000,
        "waiting_seconds": 90.0,
        "attempts": 0,
        "next_attempt_at": format_ms(RECEIVED),
        "last_status": None,
        "last_error": None,
    }

    text = admin.render_status(report)
    assert "backlog (pending): 12 vehicles, top 10" in text
    assert "held (no VIN): 1 vehicle\n" in text
    assert "add their VINs to [vehicles]" in text
    assert "HTTP 422" in text
    assert "no answer" in text
    # Multi-line errors stay on one line of the report.
    assert "HTTP 503: down for maintenance" in text
    assert "forwarder_note" in text
    assert "paused: HTTP 401" in text
    lines = text.splitlines()
    backlog_table = lines[lines.index("backlog (pending): 12 vehicles, top 10") + 1 :][:11]
    assert backlog_table[0].split() == [
        "VEHICLE", "PENDING", "OLDEST", "AGE", "ATTEMPTS", "LAST", "ANSWER"
    ]  # fmt: skip
    assert backlog_table[1].split() == [
        "7000011", "12", format_ms(T0), "1h", "1m", "ago", "1", "HTTP", "503:", "busy,", "retry"
    ]  # fmt: skip
    assert backlog_table[2].split()[:2] == ["7000010", "11"]
    assert backlog_table[2].endswith(" -")
    errors = lines[lines.index("recent errors, newest first") + 1 :][:5]
    assert errors[1].split()[:4] == [
        format_ms(RECEIVED + 4_000),
        "7000011",
        format_ms(T0),
        "retrying",
    ]
    assert errors[3].split()[3:] == ["failed", "1", "no", "answer:", "connection", "reset"]
    counts = [
        line
        for line in lines
        if line.startswith("  ") and line.split()[0] in (*admin.STATUSES, "quarantine")
    ]
    assert [line.split() for line in counts] == [
        ["pending", "78"],
        ["held", "2"],
        ["sent", "0"],
        ["failed", "3"],
        ["quarantine", "2"],
    ]
    assert len({len(line) for line in counts}) == 1  # right-aligned


async def test_status_top_limits_the_tables(config: Config, outbox: Outbox) -> None:
    backlog = {f"70000{i:02d}": i + 1 for i in range(5)}
    await store(outbox, fleet(backlog), RECEIVED, vehicles=dict.fromkeys(backlog, VIN))
    for row_id in ids(config.outbox.path, "vehicle_id = '7000004'"):
        await outbox.mark_failed(row_id, 400, "no")

    report = admin.status(config, clock=at(RECEIVED), top=2)
    assert [e["vehicle_id"] for e in report["backlog_vehicles"]] == ["7000003", "7000002"]
    assert report["pending_vehicle_count"] == 4
    assert len(report["recent_errors"]) == 2
    assert "backlog (pending): 4 vehicles, top 2" in admin.render_status(report)


def test_render_status_of_a_future_oldest_position() -> None:
    report = {
        "path": "/x",
        "size_bytes": 2_500_000,
        "wal_bytes": 0,
        "schema_version": 1,
        "generated_at": "2024-01-01T00:00:00.000Z",
        "counts": dict.fromkeys(admin.STATUSES, 0) | {"pending": 1},
        "quarantine": 0,
        "oldest_pending": {
            "vehicle_id": "1",
            "event_ts": "2024-01-01T00:10:00.000Z",
            "received_at": "2024-01-01T00:00:00.000Z",
            "age_seconds": -600.0,
            "waiting_seconds": 0.5,
            "attempts": 0,
            "next_attempt_at": "2024-01-01T00:10:00.000Z",
            "last_status": None,
            "last_error": None,
        },
        "held_vehicles": [],
        "held_vehicle_count": 0,
        "backlog_vehicles": [],
        "pending_vehicle_count": 1,
        "failed_by_status": [],
        "recent_errors": [],
        "last_error": None,
        "relay_state": {},
    }
    text = admin.render_status(report)
    assert "10m 0s in the future" in text
    assert "2.4 MiB" in text


# -- requeue ---------------------------------------------------------------------------


async def test_requeue_resets_rows_and_keeps_their_history(config: Config, outbox: Outbox) -> None:
    db = config.outbox.path
    await store(outbox, fleet({A: 2}), RECEIVED)
    first, second = ids(db)
    await outbox.mark_failed(first, 422, "chassis_number: unknown")
    await outbox.mark_retry(second, format_ms(RECEIVED + 1000), 503, "busy")
    await outbox.mark_failed(second, 404, "not found")

    now = RECEIVED + DAY_MS
    result = admin.requeue(config, clock=at(now), pause=0)
    assert result == admin.RequeueResult(pending=2, held=0, held_vehicles=())
    requeued = rows(db)
    assert [r["status"] for r in requeued] == ["pending", "pending"]
    assert [r["attempts"] for r in requeued] == [0, 0]
    assert {r["next_attempt_at"] for r in requeued} == {format_ms(now)}
    assert {r["updated_at"] for r in requeued} == {format_ms(now)}
    assert [(r["last_status"], r["last_error"]) for r in requeued] == [
        (422, "chassis_number: unknown"),
        (404, "not found"),
    ]
    # The daemon's view: both rows are due now, in time order.
    assert [r.id for r in await outbox.next_rows(A, 10)] == [first, second]


async def test_requeue_never_schedules_before_the_position(config: Config, outbox: Outbox) -> None:
    # A position a little ahead of the clock (allowed up to max_future_seconds) that
    # failed must not be sent before its time when requeued: Cartrack refuses future events.
    future = RECEIVED + 600_000
    await store(outbox, batch((A, [position(ts=format_ms(future))])), RECEIVED)
    (row_id,) = ids(config.outbox.path)
    await outbox.mark_failed(row_id, 422, "event_ts in the future")
    admin.requeue(config, clock=at(RECEIVED + 1000))
    assert rows(config.outbox.path)[0]["next_attempt_at"] == format_ms(future)


async def test_requeue_walks_in_chunks_and_passes_filtered_rows(
    config: Config, outbox: Outbox, monkeypatch: pytest.MonkeyPatch, statements: list[str]
) -> None:
    db = config.outbox.path
    await store(outbox, fleet({A: 7, B: 7, UNMAPPED: 4}), RECEIVED)
    for row_id in ids(db):
        await outbox.mark_failed(row_id, 422, "no")
    monkeypatch.setattr(changes, "CHUNK", 3)
    result = admin.requeue(config, vehicles=[A, UNMAPPED], pause=0)
    assert result == admin.RequeueResult(pending=7, held=4, held_vehicles=(UNMAPPED,))
    assert ids(db, "status = 'failed'") == ids(db, "vehicle_id = ?", (B,))
    assert len(ids(db, "status = 'pending'")) == 7
    assert ids(db, "status = 'held'") == ids(db, "vehicle_id = ?", (UNMAPPED,))
    # 11 rows, 3 per transaction: 4 transactions, each short.
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 4


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        ("yesterday", None, "since: 'yesterday' is not an ISO-8601 time"),
        (None, "2024-13-01T00:00:00Z", "until: '2024-13-01T00:00:00Z' is not an ISO-8601 time"),
        ("2024-01-02T00:00:00Z", "2024-01-01T00:00:00Z", "since: must be before until"),
        ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00+00:00", "since: must be before until"),
    ],
)
def test_requeue_rejects_unusable_times(
    config: Config, since: str | None, until: str | None, message: str
) -> None:
    with pytest.raises(admin.FilterError) as info:
        admin.requeue(config, since=since, until=until)
    assert str(info.value).startswith(message)


def test_requeue_rejects_other_statuses(config: Config) -> None:
    with pytest.raises(admin.FilterError, match="status: must be one of failed, sent"):
        admin.requeue(config, status="pending")


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("2023-10-25T16:01:00Z", "2023-10-25T16:01:00.000Z"),
        ("2023-10-25T18:01:00+02:00", "2023-10-25T16:01:00.000Z"),
        ("2023-10-25 16:01", "2023-10-25T16:01:00.000Z"),
        ("2023-10-25T16:01:00.1234Z", "2023-10-25T16:01:00.123Z"),
    ],
)
def test_parse_time(text: str, normalised: str) -> None:
    assert admin.parse_time(text) == normalised


WRITES = ("BEGIN IMMEDIATE", "UPDATE", "DELETE", "INSERT")


async def _mixed_outbox(outbox: Outbox, db: Path, seed: int) -> None:
    """Failed, sent, pending rows of mapped and unmapped vehicles at random times."""
    rng = random.Random(seed)
    await store(outbox, fleet({A: 12, B: 12, UNMAPPED: 12}), RECEIVED)
    await store(outbox, batch((A, [position(Speed=-1)])), RECEIVED - 20 * DAY_MS)
    every = ids(db)
    for row_id in every:
        outbox.clock = at(RECEIVED + rng.randrange(0, 20) * DAY_MS)
        fate = rng.choice(("failed", "sent", "pending"))
        if fate == "failed":
            await outbox.mark_failed(row_id, rng.choice((400, 404, 422)), "no")
        elif fate == "sent":
            await outbox.mark_sent([(row_id, 202)])


@pytest.mark.parametrize("seed", range(4))
async def test_dry_runs_report_exactly_what_the_real_run_changes(
    config: Config, outbox: Outbox, statements: list[str], seed: int
) -> None:
    print(f"seed={seed}")
    rng = random.Random(seed)
    db = config.outbox.path
    await _mixed_outbox(outbox, db, seed)
    for _ in range(6):
        minute = rng.randrange(0, 12)
        kwargs: dict[str, Any] = {
            "vehicles": rng.sample([A, B, UNMAPPED], rng.randrange(0, 3)),
            "since": rng.choice([None, format_ms(T0 + minute * 60_000)]),
            "until": rng.choice(
                [None, format_ms(T0 + (minute + 1 + rng.randrange(0, 6)) * 60_000)]
            ),
            "status": rng.choice(["failed", "sent"]),
        }
        before = snapshot(db)
        statements.clear()
        predicted = admin.requeue(config, dry_run=True, **kwargs)
        assert snapshot(db) == before
        assert not [sql for sql in statements if sql.startswith(WRITES)], statements
        # Which rows would move, by the same filter written out plainly.
        status = kwargs["status"]
        moved = [
            r
            for r in rows(db, "status = ?", (status,))
            if (not kwargs["vehicles"] or r["vehicle_id"] in kwargs["vehicles"])
            and (kwargs["since"] is None or r["event_ts"] >= kwargs["since"])
            and (kwargs["until"] is None or r["event_ts"] < kwargs["until"])
        ]
        actual = admin.requeue(config, pause=0, **kwargs)
        assert predicted.pending == actual.pending == sum(r["vehicle_id"] in MAPPED for r in moved)
        assert predicted.held == actual.held == sum(r["vehicle_id"] == UNMAPPED for r in moved)
        assert set(predicted.held_vehicles) == set(actual.held_vehicles)
        after = snapshot(db)
        changed = {old[0] for old, new in zip(before, after, strict=True) if old != new}
        assert changed == {r["id"] for r in moved}

    for days in (0, 3, 10, 30):
        now = RECEIVED + 21 * DAY_MS
        before = snapshot(db)
        statements.clear()
        predicted = admin.purge(config, days, quarantine=True, dry_run=True, clock=at(now))
        assert snapshot(db) == before
        assert not [sql for sql in statements if sql.startswith(WRITES)], statements
        actual = admin.purge(config, days, quarantine=True, clock=at(now), pause=0)
        assert predicted == actual
        assert len(before) - len(snapshot(db)) == actual["sent"] + actual["quarantine"]


# -- purge -----------------------------------------------------------------------------


async def test_purge_deletes_only_old_sent_rows_and_old_quarantine(
    config: Config, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = config.outbox.path
    now = RECEIVED + 30 * DAY_MS
    await store(outbox, fleet({A: 8}), RECEIVED)
    await store(outbox, batch((A, [position(Speed=-1)])), RECEIVED)
    await store(outbox, batch((A, [position(Speed=-2)])), now - DAY_MS)
    every = ids(db)
    outbox.clock = at(now - 10 * DAY_MS)
    await outbox.mark_sent([(every[0], 202), (every[1], 202), (every[2], 409)])
    outbox.clock = at(now - 1 * DAY_MS)
    await outbox.mark_sent([(every[3], 202)])
    await outbox.mark_failed(every[4], 422, "no")
    await outbox.hold_vehicle(A)  # every[5:] held
    await store(outbox, fleet({B: 1}), now - 20 * DAY_MS)  # pending, very old
    monkeypatch.setattr(changes, "CHUNK", 2)

    before = snapshot(db)
    assert admin.purge(config, 7, quarantine=True, dry_run=True, clock=at(now)) == {
        "sent": 3,
        "quarantine": 1,
    }
    assert snapshot(db) == before

    assert admin.purge(config, 7, clock=at(now), pause=0) == {"sent": 3, "quarantine": 0}
    assert ids(db, "status = 'sent'") == [every[3]]
    assert admin.purge(config, 7, quarantine=True, clock=at(now), pause=0) == {
        "sent": 0,
        "quarantine": 1,
    }
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT received_at FROM quarantine").fetchall() == [
        (format_ms(now - DAY_MS),)
    ]
    conn.close()
    assert admin.purge(config, 0, clock=at(now), pause=0) == {"sent": 1, "quarantine": 0}
    counts = admin.status(config)["counts"]
    assert counts == {"pending": 1, "held": 3, "sent": 0, "failed": 1}


@pytest.mark.parametrize("days", [1e12, 36_500])
async def test_purge_with_an_absurd_age_deletes_nothing(
    config: Config, outbox: Outbox, days: float
) -> None:
    await store(outbox, fleet({A: 1}), RECEIVED)
    await outbox.mark_sent([(ids(config.outbox.path)[0], 202)])
    assert admin.purge(config, days, quarantine=True, clock=at(RECEIVED)) == {
        "sent": 0,
        "quarantine": 0,
    }


@pytest.mark.parametrize("days", [-1, math.nan, math.inf])
def test_purge_rejects_unusable_ages(config: Config, days: float) -> None:
    with pytest.raises(admin.FilterError, match="days: must be a finite number >= 0"):
        admin.purge(config, days)


# -- query plans: fast with millions of sent rows ----------------------------------------

ALLOWED_SCANS = ("positions_pending", "positions_held", "positions_failed")


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "after-ANALYZE"])
async def test_no_query_scans_the_positions_table(
    config: Config, outbox: Outbox, statements: list[str], analyzed: bool
) -> None:
    db = config.outbox.path
    # Mostly sent rows, like a relay that has run for a while.
    await store(outbox, fleet({f"8{i:06d}": 60 for i in range(40)}), RECEIVED)
    every = ids(db)
    await outbox.mark_sent([(row_id, 202) for row_id in every[:2200]])
    for row_id in every[2200:2230]:
        await outbox.mark_failed(row_id, 422, "no")
    await outbox.hold_vehicle("8000039")
    await outbox.set_state("last_error", "HTTP 422: no")
    if analyzed:
        conn = sqlite3.connect(db)
        conn.execute("ANALYZE")
        conn.close()

    admin.status(config)
    for status in ("failed", "sent"):
        for vehicles in ([], ["8000001", "8000002"]):
            for dry_run in (True, False):
                admin.requeue(
                    config,
                    vehicles=vehicles,
                    since="2023-10-25T16:10:00Z",
                    until="2023-10-25T17:00:00Z",
                    status=status,
                    dry_run=dry_run,
                )
    admin.purge(config, 1, quarantine=True, dry_run=True)
    admin.purge(config, 1, quarantine=True, pause=0)
    admin.purge(config, 0, pause=0)
    admin.inspect_vehicle(config, "8000001")
    admin.inspect_vehicle(
        config, "8000001", since="2023-10-25T16:10:00Z", until="2023-10-25T17:00Z"
    )
    admin.inspect_event(config, "frotcom:8000001:2023-10-25T16:10:00.000Z")

    conn = sqlite3.connect(db)
    checked = set()
    for sql in dict.fromkeys(s.strip() for s in statements):
        if "positions" not in sql or not sql.startswith(("SELECT", "UPDATE", "DELETE")):
            continue
        checked.add(sql.split(" WHERE ")[0])
        plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for step in plan:
            if step.startswith("SCAN positions"):
                assert step.endswith(ALLOWED_SCANS), (sql, plan)
            else:
                # b: the per-vehicle aggregate of the status report, one row per vehicle;
                # the constant row holds the per-status counts, one subquery each.
                assert step in ("SCAN b", "SCAN CONSTANT ROW") or not step.startswith("SCAN"), (
                    sql,
                    plan,
                )
    conn.close()
    # Every kind of statement the commands run on positions was checked (14 today).
    assert len(checked) >= 14, "\n".join(sorted(checked))
