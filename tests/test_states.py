"""The writer's cache of vehicle states: read once, and never different from what is stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import batch, position
from outbox_helpers import in_one_group, statements, store, table, ts, types

from relay.mapping import VehicleState
from relay.outbox import states as states_module
from relay.outbox.states import VehicleStates, load_states
from relay.outbox.storage import Outbox
from relay.timeutil import parse_timestamp

V1 = "9876543"
V2 = "1111111"


def stored_state(db: Path, vehicle_id: str) -> list[tuple[str, int]]:
    return table(
        db, "SELECT last_ts, ignition FROM vehicle_state WHERE vehicle_id = ?", (vehicle_id,)
    )


def kept(outbox: Outbox) -> dict[str, VehicleState | None]:
    return dict(outbox._states._committed)


async def test_a_group_reads_only_the_vehicles_it_has_not_seen(outbox: Outbox) -> None:
    await store(outbox, batch((V1, [position(ts(1))])))
    seen = statements(outbox)
    await store(outbox, batch((V1, [position(ts(2))])))
    assert [s.split(" (")[0].split(" VALUES")[0] for s in seen] == [
        "BEGIN IMMEDIATE",
        "PRAGMA data_version",
        "INSERT OR IGNORE INTO positions",
        "INSERT INTO vehicle_state",
        "COMMIT",
    ]
    seen.clear()
    await store(outbox, batch((V1, [position(ts(3))]), (V2, [position(ts(3))])))
    assert [s for s in seen if s.startswith("SELECT")] == [
        # V2 alone (padded to a statement size by repeating it)
        "SELECT json_group_array(json_array(vehicle_id, last_ts, ignition)) FROM vehicle_state"
        " WHERE vehicle_id IN ('1111111')"
    ]


async def test_event_types_follow_the_kept_state_across_groups(
    outbox: Outbox, db_path: Path
) -> None:
    await store(outbox, batch((V1, [position(ts(1), ignition=True)])))
    await store(outbox, batch((V1, [position(ts(2), ignition=False)])))
    await store(outbox, batch((V1, [position(ts(3), ignition=False)])))
    await store(outbox, batch((V1, [position(ts(0), ignition=True)])))  # late: no change
    await store(outbox, batch((V1, [position(ts(4), ignition=True)])))
    assert types(db_path) == [
        (ts(0), "PERIODIC"),
        (ts(1), "PERIODIC"),
        (ts(2), "IGNITION_OFF"),
        (ts(3), "PERIODIC"),
        (ts(4), "IGNITION_ON"),
    ]
    assert kept(outbox)[V1] == VehicleState(parse_timestamp(ts(4)), True)
    assert stored_state(db_path, V1) == [(ts(4), 1)]


async def test_a_state_another_connection_changed_is_read_again(
    outbox: Outbox, db_path: Path
) -> None:
    # Someone in the sqlite3 shell (or any other process) commits to the file: the
    # connection's data_version moves, and what the writer kept is dropped.
    await store(outbox, batch((V1, [position(ts(1), ignition=True)])))
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("UPDATE vehicle_state SET ignition = 0 WHERE vehicle_id = ?", (V1,))
    finally:
        other.close()
    await store(outbox, batch((V1, [position(ts(2), ignition=True)])))
    assert types(db_path) == [(ts(1), "PERIODIC"), (ts(2), "IGNITION_ON")]


async def test_states_of_a_transaction_that_did_not_commit_are_not_kept(
    outbox: Outbox, db_path: Path
) -> None:
    await store(outbox, batch((V1, [position(ts(1), ignition=True)])))

    class Lost(Exception):
        pass

    def lose_the_transaction(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # as SQLite does on an I/O error or a full disk
        raise Lost

    # The batch is combined (its state staged), then the transaction goes: the batch
    # is not stored, and its state (ignition off at 0:02) must not be kept either.
    (lost_batch, lost), _ = await in_one_group(
        outbox,
        store(outbox, batch((V1, [position(ts(2), ignition=False)]))),
        outbox._write(lose_the_transaction),
        return_exceptions=True,
    )
    assert isinstance(lost_batch, Lost)
    assert isinstance(lost, Lost)
    assert stored_state(db_path, V1) == [(ts(1), 1)]
    await store(outbox, batch((V2, [position(ts(2))])))  # a group that commits
    await store(outbox, batch((V1, [position(ts(3), ignition=False)])))
    assert types(db_path) == [(ts(1), "PERIODIC"), (ts(3), "IGNITION_OFF")]
    assert kept(outbox)[V1] == VehicleState(parse_timestamp(ts(3)), False)


async def test_a_resent_batch_in_a_group_leaves_the_kept_states_right(
    outbox: Outbox, db_path: Path
) -> None:
    # A duplicate sends the group back through one savepoint per request, after a
    # ROLLBACK that empties the cache: what it keeps afterwards is read again.
    await store(outbox, batch((V1, [position(ts(1), ignition=True)])))
    await in_one_group(
        outbox,
        store(outbox, batch((V1, [position(ts(2), ignition=False)]))),
        store(outbox, batch((V1, [position(ts(1), ignition=True)]))),  # re-sent
        store(outbox, batch((V2, [position(ts(2), ignition=True)]))),
    )
    assert V1 not in kept(outbox)
    assert V2 not in kept(outbox)
    await store(outbox, batch((V1, [position(ts(3), ignition=True)])))
    assert types(db_path) == [
        (ts(1), "PERIODIC"),
        (ts(2), "IGNITION_OFF"),
        (ts(3), "IGNITION_ON"),
    ]
    assert kept(outbox)[V1] == VehicleState(parse_timestamp(ts(3)), True)


async def test_past_its_bound_the_cache_starts_over(
    outbox: Outbox, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(states_module, "MAX_CACHED", 1)
    await store(outbox, batch((V1, [position(ts(1), ignition=True)])))
    await store(outbox, batch((V2, [position(ts(1), ignition=True)])))
    assert set(kept(outbox)) == {V1, V2}
    await store(outbox, batch((V1, [position(ts(2), ignition=False)])))
    assert set(kept(outbox)) == {V1}
    assert types(db_path) == [(ts(1), "PERIODIC"), (ts(2), "IGNITION_OFF")]


def test_staged_states_are_kept_on_commit_and_everything_dropped_on_rollback(
    tmp_path: Path,
) -> None:
    conn = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None)
    conn.execute(
        "CREATE TABLE vehicle_state (vehicle_id TEXT PRIMARY KEY, last_ts TEXT, ignition INT,"
        " updated_at TEXT)"
    )
    conn.execute("INSERT INTO vehicle_state VALUES ('A', ?, 1, 'x')", (ts(1),))
    cache = VehicleStates()
    on = VehicleState(parse_timestamp(ts(1)), True)
    off = VehicleState(parse_timestamp(ts(2)), False)
    assert cache.load(conn, ["A", "B"]) == {"A": on} == load_states(conn, ["A", "B"])
    cache.stage({"A": off})
    assert cache.load(conn, ["A"]) == {"A": on}  # staged is not committed
    cache.committed()
    assert cache.load(conn, ["A", "B"]) == {"A": off}
    cache.stage({"B": on})
    cache.rolled_back()
    assert cache._committed == {}
    assert cache._staged == {}
    assert cache.load(conn, ["A", "B"]) == {"A": on}  # read from the file again
    conn.close()
