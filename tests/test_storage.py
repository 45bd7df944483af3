"""The outbox against real SQLite files: what store_batch and the forwarder's writes leave behind."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, NOW_MS, VIN, Clock, batch, position, rows
from outbox_helpers import big_batch, parsed, store, table, ts, types

from relay.outbox import storage
from relay.outbox.batch import batch_job
from relay.outbox.schema import connect
from relay.outbox.storage import Outbox, StoreResult
from relay.timeutil import format_ms

# -- store_batch -----------------------------------------------------------------------


async def test_store_batch_counts_and_rows(outbox: Outbox, db_path: Path) -> None:
    body = batch(
        ("9876543", [position(ts(1)), position(ts(2)), position(ts(2)), position(ts(3), lat=91)]),
        ("5555555", [position(ts(1))]),  # not in the vehicle map: held
    )
    result = await store(outbox, body)
    assert result == StoreResult(
        accepted=3, duplicates=1, held=1, quarantined=1, vehicles=frozenset({"9876543"})
    )
    stored = rows(db_path)
    assert [(r["vehicle_id"], r["event_ts"], r["status"]) for r in stored] == [
        ("5555555", ts(1), "held"),
        ("9876543", ts(1), "pending"),
        ("9876543", ts(2), "pending"),
    ]
    row = stored[1]
    assert row["provider_event_id"] == f"frotcom:9876543:{ts(1)}"
    assert row["event_type"] == "PERIODIC"
    assert row["attempts"] == 0
    assert row["received_at"] == row["updated_at"] == row["next_attempt_at"] == NOW
    assert (row["sent_at"], row["last_status"], row["last_error"]) == (None, None, None)
    assert json.loads(row["source"]) == position(ts(1))
    payload = json.loads(row["payload"])
    assert payload["source"]["provider_event_id"] == row["provider_event_id"]
    assert payload["source"]["provider_received_ts"] == NOW
    assert "chassis_number" not in payload  # added at send time from the current map
    assert table(db_path, "SELECT vehicle_id, reason, raw FROM quarantine") == [
        (
            "9876543",
            "Latitude: 91 out of range (-90..90)",
            json.dumps(position(ts(3), lat=91), separators=(",", ":")),
        )
    ]


async def test_resent_batch_adds_nothing(outbox: Outbox, db_path: Path, clock: Clock) -> None:
    body = batch(
        ("9876543", [position(ts(1)), position(ts(2), ignition=False), position(ts(3), speed=-1)]),
        ("5555555", [position(ts(1))]),
        ("", [position(ts(1))]),  # quarantined whole
    )
    first = await store(outbox, body)
    before = (rows(db_path), table(db_path, "SELECT * FROM quarantine"))
    state = table(db_path, "SELECT * FROM vehicle_state")
    clock.ms += 60_000
    again = await store(outbox, body, received_ms=clock.ms)
    assert first == StoreResult(3, 0, 1, 2, frozenset({"9876543"}))
    # The quarantine count still tells Frotcom's operator what was not used.
    assert again == StoreResult(0, 3, 0, 2, frozenset())
    assert (rows(db_path), table(db_path, "SELECT * FROM quarantine")) == before
    assert table(db_path, "SELECT * FROM vehicle_state") == state


async def test_two_spellings_of_one_position_are_one_row(outbox: Outbox, db_path: Path) -> None:
    body = batch(("9876543", [position("2023-10-25T16:29:31Z")]))
    await store(outbox, body)
    result = await store(outbox, batch(("9876543", [position("2023-10-25T18:29:31.000+02:00")])))
    assert (result.accepted, result.duplicates) == (0, 1)
    assert len(rows(db_path)) == 1


async def test_event_types_survive_a_restart(db_path: Path, clock: Clock) -> None:
    steps = [
        (ts(1), True, "PERIODIC"),  # first ever
        (ts(2), False, "IGNITION_OFF"),
        (ts(3), False, "PERIODIC"),
        (ts(4), True, "IGNITION_ON"),
    ]
    for stamp, ignition, _ in steps:
        box = await Outbox.open(db_path, clock)
        try:
            await store(box, batch(("9876543", [position(stamp, ignition=ignition)])))
        finally:
            await box.close()
    assert types(db_path) == [(stamp, kind) for stamp, _, kind in steps]
    assert table(db_path, "SELECT vehicle_id, last_ts, ignition FROM vehicle_state") == [
        ("9876543", ts(4), 1)
    ]


async def test_positions_of_one_batch_are_typed_in_time_order(
    outbox: Outbox, db_path: Path
) -> None:
    # Two messages for one vehicle, the later one first, each internally unordered.
    body = batch(
        ("9876543", [position(ts(4), ignition=True), position(ts(3), ignition=False)]),
        ("9876543", [position(ts(2), ignition=True), position(ts(1), ignition=True)]),
        ("1111111", [position(ts(2), ignition=False), position(ts(1), ignition=True)]),
    )
    await store(outbox, body)
    assert types(db_path) == [
        (ts(1), "PERIODIC"),
        (ts(2), "PERIODIC"),
        (ts(3), "IGNITION_OFF"),
        (ts(4), "IGNITION_ON"),
    ]
    assert types(db_path, "1111111") == [(ts(1), "PERIODIC"), (ts(2), "IGNITION_OFF")]


async def test_late_arrival_is_periodic_and_keeps_the_state(outbox: Outbox, db_path: Path) -> None:
    await store(outbox, batch(("9876543", [position(ts(1)), position(ts(5), ignition=False)])))
    await store(outbox, batch(("9876543", [position(ts(3), ignition=True)])))
    assert table(db_path, "SELECT last_ts, ignition FROM vehicle_state") == [(ts(5), 0)]
    await store(outbox, batch(("9876543", [position(ts(6), ignition=False)])))
    assert types(db_path) == [
        (ts(1), "PERIODIC"),
        (ts(3), "PERIODIC"),
        (ts(5), "IGNITION_OFF"),
        (ts(6), "PERIODIC"),
    ]


async def test_future_position_waits_until_due(outbox: Outbox, db_path: Path) -> None:
    soon = format_ms(NOW_MS + 3_600_000)
    await store(outbox, batch(("9876543", [position(ts(1)), position(soon)])))
    assert [(r["event_ts"], r["status"], r["next_attempt_at"]) for r in rows(db_path)] == [
        (ts(1), "pending", NOW),
        (soon, "pending", soon),
    ]


async def test_unmapped_vehicle_is_held_then_released(outbox: Outbox, db_path: Path) -> None:
    body = batch(("5555555", [position(ts(1)), position(ts(2))]), ("9876543", [position(ts(1))]))
    result = await store(outbox, body)
    assert (result.accepted, result.held, result.vehicles) == (3, 2, frozenset({"9876543"}))
    assert await outbox.pending_vehicles() == ["9876543"]
    assert await outbox.release_held(["4444444"]) == {}
    assert await outbox.release_held(["5555555", "9876543", "5555555"]) == {"5555555": 2}
    assert [r["status"] for r in rows(db_path, "vehicle_id = '5555555'")] == ["pending"] * 2
    assert await outbox.pending_vehicles() == ["5555555", "9876543"]
    assert await outbox.release_held(["5555555"]) == {}


async def test_hold_vehicle_parks_only_its_pending_rows(
    outbox: Outbox, db_path: Path, clock: Clock
) -> None:
    await store(
        outbox,
        batch(("9876543", [position(ts(1)), position(ts(2))]), ("1111111", [position(ts(1))])),
    )
    first = (await outbox.next_rows("9876543", 1))[0]
    await outbox.mark_sent([(first.id, 200)])
    clock.ms += 1000
    assert await outbox.hold_vehicle("9876543") == 1
    assert [(r["event_ts"], r["status"]) for r in rows(db_path, "vehicle_id = '9876543'")] == [
        (ts(1), "sent"),
        (ts(2), "held"),
    ]
    assert rows(db_path, "status = 'held'")[0]["updated_at"] == format_ms(clock.ms)
    assert await outbox.pending_vehicles() == ["1111111"]


def _open_temp_files() -> list[str]:
    """SQLite's temporary files this process holds open (each deleted once created)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used, closed by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "etilqs_" in target:
                found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
async def test_a_big_insert_keeps_its_statement_journal_off_the_disk(outbox: Outbox) -> None:
    # The json_valid CHECKs make SQLite give each multi-row INSERT a statement journal
    # (a CHECK that calls a function might abort the statement half way), holding every
    # page the INSERT changes that existed before it. Past 64 KiB that journal went to a
    # temporary file, made and deleted in the writer's thread inside the group: traced
    # at 8 senders, in half of the groups. temp_store = MEMORY keeps it in memory.
    fleet = {str(1_000_000 + n): VIN for n in range(400)}
    ids = list(fleet)
    for start in range(0, len(ids), 40):  # every vehicle has rows, spread over many pages
        chunk = ids[start : start + 40]
        await store(
            outbox, batch(*((v, [position(ts(s)) for s in range(10)]) for v in chunk)), fleet
        )
    body = batch(*((v, [position(ts(s)) for s in range(10, 20)]) for v in ids))
    job = batch_job(parsed(body), fleet, "frotcom", NOW_MS)
    open_in_transaction: list[str] = []

    def work(conn: sqlite3.Connection) -> StoreResult:
        result = job(conn)
        open_in_transaction.extend(_open_temp_files())
        return result

    result = await outbox._write(work)
    assert result.accepted == 4000
    assert open_in_transaction == []


_RELEASE_AND_HOLD = """
import asyncio, resource, sys
from pathlib import Path
from relay.outbox.storage import Outbox

async def main():
    box = await Outbox.open(Path(sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    released = await box.release_held(["1000000"])
    held = await box.hold_vehicle("1000000")
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    await box.close()
    print(released["1000000"], held, grew // 1024)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB")
def test_releasing_and_holding_a_long_backlog_keeps_memory_bounded(tmp_path: Path) -> None:
    # A vehicle unmapped for weeks collects held rows between everyone else's. The
    # writer keeps statement journals in memory, and one UPDATE over all of them held
    # a copy of every page it changed: ~440 MB for 100,000 rows in a 1M-row outbox.
    # In statements of ROWS_PER_UPDATE rows it is a few MB (plus the page cache).
    db = tmp_path / "outbox.sqlite3"
    conn = connect(db, create=True)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    payload, source = json.dumps({"x": "y" * 250}), json.dumps({"a": "b" * 110})
    stamp = format_ms(NOW_MS)
    conn.executemany(
        "INSERT INTO positions (provider_event_id, vehicle_id, event_ts, event_type, status,"
        " next_attempt_at, received_at, updated_at, payload, source)"
        " VALUES (?, ?, ?, 'PERIODIC', ?, ?, ?, ?, ?, ?)",
        (
            (f"frotcom:{v}:{n:09d}", v, stamp, status, stamp, stamp, stamp, payload, source)
            for n in range(100_000)
            for v, status in [("1000000", "held") if n % 10 == 0 else (str(n % 500), "sent")]
        ),
    )
    conn.execute("COMMIT")
    conn.close()
    done = subprocess.run(
        [sys.executable, "-c", _RELEASE_AND_HOLD, str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    released, held, grew_mb = map(int, done.stdout.split())
    assert (released, held) == (10_000, 10_000)
    # Measured: 12 MB in statements of 500 rows, 48 MB in one statement each.
    assert grew_mb < 30, f"peak RSS grew {grew_mb} MB"


# -- forwarder's writes ----------------------------------------------------------------


async def test_mark_functions_change_only_pending_rows(
    outbox: Outbox, db_path: Path, clock: Clock
) -> None:
    await store(
        outbox,
        batch(("9876543", [position(ts(s)) for s in (1, 2, 3, 4)]), ("5555555", [position(ts(1))])),
    )
    ids = {r["event_ts"]: r["id"] for r in rows(db_path, "vehicle_id = '9876543'")}
    held_id = rows(db_path, "status = 'held'")[0]["id"]
    clock.ms += 5000
    later = format_ms(clock.ms)

    await outbox.mark_sent([(ids[ts(1)], 200), (ids[ts(2)], 409)])
    await outbox.mark_retry(ids[ts(3)], "2023-10-25T17:00:00.000Z", 503, "busy")
    await outbox.mark_failed(ids[ts(4)], 422, '{"errors": ["x"]}')
    expected = {
        ts(1): ("sent", 1, later, 200, None, NOW),
        ts(2): ("sent", 1, later, 409, None, NOW),
        ts(3): ("pending", 1, None, 503, "busy", "2023-10-25T17:00:00.000Z"),
        ts(4): ("failed", 1, None, 422, '{"errors": ["x"]}', NOW),
    }

    def snapshot() -> dict[str, tuple[Any, ...]]:
        return {
            r["event_ts"]: (
                r["status"],
                r["attempts"],
                r["sent_at"],
                r["last_status"],
                r["last_error"],
                r["next_attempt_at"],
            )
            for r in rows(db_path, "vehicle_id = '9876543'")
        }

    assert snapshot() == expected
    assert all(r["updated_at"] == later for r in rows(db_path, "vehicle_id = '9876543'"))

    # Sent, failed and held rows are left alone by every mark_*.
    clock.ms += 5000
    untouched = rows(db_path)
    for row_id in (ids[ts(1)], ids[ts(4)], held_id):
        if row_id != held_id:
            await outbox.mark_sent([(row_id, 200)])
        await outbox.mark_retry(row_id, "2099-01-01T00:00:00.000Z", 500, "again")
        await outbox.mark_failed(row_id, 400, "no")
    assert [tuple(r) for r in rows(db_path)] == [tuple(r) for r in untouched]

    # ...except that a held row delivered while in flight (its vehicle was unmapped
    # meanwhile) is recorded as sent, so its release does not send it again.
    await outbox.mark_sent([(held_id, 202)])
    (held_row,) = rows(db_path, "id = ?", (held_id,))
    assert (held_row["status"], held_row["last_status"]) == ("sent", 202)


async def test_purge_sent_deletes_only_old_sent_rows(
    outbox: Outbox, db_path: Path, clock: Clock
) -> None:
    await store(outbox, batch(("9876543", [position(ts(s)) for s in range(1, 9)])))
    ids = [r["id"] for r in rows(db_path)]
    await outbox.mark_sent([(i, 200) for i in ids[:5]])  # old sent rows
    await outbox.mark_failed(ids[5], 400, "bad")  # old failed row
    clock.ms += 86_400_000
    await outbox.mark_sent([(ids[6], 200)])  # a recent sent row; ids[7] stays pending
    cutoff = format_ms(clock.ms - 1000)
    assert await outbox.purge_sent(cutoff, chunk=2) == 5
    assert [(r["id"], r["status"]) for r in rows(db_path)] == [
        (ids[5], "failed"),
        (ids[6], "sent"),
        (ids[7], "pending"),
    ]
    assert await outbox.purge_sent(cutoff) == 0


async def test_pending_vehicles_and_next_rows(outbox: Outbox, db_path: Path) -> None:
    assert await outbox.pending_vehicles() == []
    await store(outbox, batch(("9876543", [position(ts(5)), position(ts(3))])))
    await store(
        outbox,
        batch(
            ("9876543", [position(ts(1)), position(ts(4))]),
            ("1111111", [position(ts(2))]),
            ("0000001", [position(ts(1))]),  # held
        ),
    )
    assert await outbox.pending_vehicles() == ["1111111", "9876543"]
    head = await outbox.next_rows("9876543", 3)
    assert [r.event_ts for r in head] == [ts(1), ts(3), ts(4)]
    assert all(r.vehicle_id == "9876543" and r.attempts == 0 for r in head)
    assert json.loads(head[0].payload)["event_ts"] == ts(1)
    await outbox.mark_sent([(head[0].id, 200)])
    await outbox.mark_failed(head[1].id, 422, "no")
    assert [r.event_ts for r in await outbox.next_rows("9876543", 10)] == [ts(4), ts(5)]
    await outbox.mark_sent([(r.id, 200) for r in await outbox.next_rows("1111111", 10)])
    assert await outbox.pending_vehicles() == ["9876543"]
    assert await outbox.counts() == {"pending": 2, "held": 1, "sent": 2, "failed": 1}


async def test_quarantine_keeps_any_input(outbox: Outbox, db_path: Path) -> None:
    # Lone surrogates and huge integers decode in Python; they must still be storable.
    odd = position(ts(1), Driver="\ud800", Latitude=10**400)
    result = await store(outbox, batch(("9876543", [odd, position(ts(2), Note="\udfff")])))
    assert (result.accepted, result.quarantined) == (1, 1)
    ((raw, reason),) = table(db_path, "SELECT raw, reason FROM quarantine")
    assert json.loads(raw) == odd
    assert reason.startswith("Latitude: ")
    assert json.loads(rows(db_path)[0]["source"])["Note"] == "\udfff"


# -- integrity and failures ------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE positions SET status = 'done'",
        "UPDATE positions SET status = NULL",
        "UPDATE positions SET event_type = 'IGNITION'",
        "UPDATE positions SET attempts = -1",
        "UPDATE positions SET payload = '{not json'",
        "UPDATE positions SET source = ''",
        "INSERT INTO positions (provider_event_id, vehicle_id, event_ts, event_type, status,"
        " next_attempt_at, received_at, updated_at, payload, source)"
        " SELECT provider_event_id, vehicle_id, event_ts, event_type, status,"
        " next_attempt_at, received_at, updated_at, payload, source FROM positions",
        "UPDATE vehicle_state SET ignition = 2",
        "INSERT INTO quarantine (received_at, reason, raw, fingerprint)"
        " SELECT received_at, reason, raw, fingerprint FROM quarantine",
    ],
)
async def test_constraints_refuse_bad_rows(outbox: Outbox, db_path: Path, sql: str) -> None:
    await store(outbox, batch(("9876543", [position(ts(1)), position(ts(2), lat=-91)])))
    conn = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(sql)
    finally:
        conn.close()


def everything(db: Path) -> list[Any]:
    return [
        table(db, f"SELECT * FROM {name} ORDER BY 1")
        for name in ("positions", "quarantine", "vehicle_state", "relay_state")
    ]


async def test_disk_full_rolls_back_the_whole_batch(outbox: Outbox, db_path: Path) -> None:
    await store(outbox, batch(("9876543", [position(ts(1), ignition=False)])))
    before = everything(db_path)
    # SQLite's own "disk full" path: cap the file at its current size on the outbox's
    # connection (the setting is per connection), so the write fails part-way.
    conn = outbox._conn
    async with conn.execute("PRAGMA page_count") as cursor:
        (pages,) = await cursor.fetchone()  # type: ignore[misc]
    await conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        await store(outbox, big_batch())
    assert everything(db_path) == before
    assert await outbox.counts() == {"pending": 1, "held": 0, "sent": 0, "failed": 0}

    await conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    result = await store(outbox, big_batch())
    assert (result.accepted, result.held, result.quarantined) == (1501, 1, 1)


async def test_locked_outbox_fails_after_the_busy_timeout(
    db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_MS", 50)
    box = await Outbox.open(db_path, clock)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. a long CLI transaction
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await store(box, big_batch(10))
        other.execute("ROLLBACK")
        assert everything(db_path)[0] == []
        assert (await store(box, big_batch(10))).accepted == 11
    finally:
        other.close()
        await box.close()


async def test_reopen_sees_committed_rows(db_path: Path, clock: Clock) -> None:
    box = await Outbox.open(db_path, clock)
    await store(box, big_batch(20))
    await box.set_state("last_error", "x")
    await box.close()
    again = await Outbox.open(db_path, clock)
    try:
        await again.check_writable()
        assert await again.counts() == {"pending": 20, "held": 1, "sent": 0, "failed": 0}
    finally:
        await again.close()
    assert table(db_path, "SELECT key, value, updated_at FROM relay_state") == [
        ("last_error", "x", NOW)
    ]


async def test_pending_vehicles_seeks_the_partial_index(outbox: Outbox, db_path: Path) -> None:
    # A full sort per vehicle made the forwarder's rescan take seconds on a large backlog:
    # every step of the loose scan must be an index seek, never a scan of positions.
    conn = sqlite3.connect(db_path)
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {storage.PENDING_VEHICLES}")]
    finally:
        conn.close()
    searches = [step for step in plan if "positions" in step]
    assert searches == [
        "SEARCH positions USING INDEX positions_pending",
        "SEARCH positions USING INDEX positions_pending (vehicle_id>?)",
    ]
