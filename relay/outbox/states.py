"""Vehicles' stored states (newest instant, ignition), read once and then kept by the writer.

Every webhook group needs its vehicles' states to type its events, and used to read
them with a SELECT inside its transaction: ~0.3 ms of a ~5 ms group, half of it
waiting to win the GIL back from the event loop. The writer's connection is the only
one that writes ``vehicle_state``, so ``VehicleStates`` keeps what it committed and a
group reads only vehicles it has not seen yet.

What it keeps must be exactly what is committed:
- a group's new states are *staged* and become the committed ones only when the
  writer's COMMIT succeeds (``committed``);
- a transaction that did not commit, or may not have (a failed COMMIT), empties the
  cache (``rolled_back``): rare, and a wrong state would mistype events for good. So
  does the ROLLBACK before a group's batches run one by one in savepoints (a re-sent
  batch): those read and write the file, and the cache starts empty after them;
- anything else that commits to the file (the CLI, someone in the sqlite3 shell)
  changes ``PRAGMA data_version``, checked in every group, and the cache starts over.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from relay.mapping import VehicleState
from relay.outbox.writer import chunks, padded_in
from relay.timeutil import parse_instant

_CHUNK = 500  # bound on SQL variables per statement
# A bound on memory for a relay fed ever new VehicleIDs; past it the cache starts over
# (about 200 bytes an entry). Real fleets are a few thousand vehicles.
MAX_CACHED = 100_000


def load_states(conn: sqlite3.Connection, vehicle_ids: Sequence[str]) -> dict[str, VehicleState]:
    """The stored states of ``vehicle_ids`` (absent: no position seen yet)."""
    # One row for all vehicles (a JSON array): one SQLite step, one GIL handoff.
    states: dict[str, VehicleState] = {}
    for chunk in chunks(vehicle_ids, _CHUNK):
        padded = padded_in(chunk)  # a few statement texts, each prepared once
        (found,) = conn.execute(
            "SELECT json_group_array(json_array(vehicle_id, last_ts, ignition))"
            f" FROM vehicle_state WHERE vehicle_id IN ({','.join('?' * len(padded))})",
            padded,
        ).fetchone()
        for vid, last_ts, ignition in orjson.loads(found):
            states[vid] = VehicleState(parse_instant(last_ts)[0], bool(ignition))
    return states


class VehicleStates:
    """The committed states the writer's connection wrote, by vehicle; writer thread only.

    Also a transaction listener for ``GroupWriter``: it calls ``committed`` after each
    COMMIT and ``rolled_back`` after each ROLLBACK of the writer's connection.
    """

    def __init__(self) -> None:
        # None: known to have no stored state (a vehicle not seen yet).
        self._committed: dict[str, VehicleState | None] = {}
        self._staged: dict[str, VehicleState] = {}
        self._version: int | None = None

    def load(self, conn: sqlite3.Connection, vehicle_ids: Sequence[str]) -> dict[str, VehicleState]:
        """The committed states of ``vehicle_ids``; in the writer's open transaction."""
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        known = self._committed
        if version != self._version or len(known) > MAX_CACHED:
            # Another connection committed (or the cache is full): nothing kept is sure.
            known.clear()
            self._version = version
        missing = [v for v in vehicle_ids if v not in known]
        if missing:
            found = load_states(conn, missing)
            for v in missing:
                known[v] = found.get(v)
        states: dict[str, VehicleState] = {}
        for v in vehicle_ids:
            state = known[v]
            if state is not None:
                states[v] = state
        return states

    def stage(self, states: dict[str, VehicleState]) -> None:
        """States written in the open transaction: kept once it commits."""
        self._staged.update(states)

    def committed(self) -> None:
        self._committed.update(self._staged)
        self._staged.clear()

    def rolled_back(self) -> None:
        self._committed.clear()
        self._staged.clear()
