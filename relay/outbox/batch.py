"""What one webhook request writes: its positions as outbox rows, its rejects, states.

``batch_job`` prepares everything that does not depend on stored state on the event
loop (the Cartrack events and the JSON texts) and returns the job the group writer
runs in its thread: read the vehicles' states, decide event types, and insert with a
few multi-row statements whatever the batch size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay.frotcom import Batch, Documented
from relay.mapping import (
    Position,
    VehicleState,
    build_event,
    event_id,
    event_types,
)
from relay.outbox.states import VehicleStates, load_states
from relay.outbox.writer import Uncombinable, insert_flat, insert_rows
from relay.timeutil import format_ms

_WIDTH = 10  # values per positions row (INSERT_POSITION)


@dataclass(frozen=True, slots=True)
class StoreResult:
    accepted: int
    duplicates: int
    held: int
    quarantined: int
    vehicles: frozenset[str] = field(default_factory=frozenset)


def _dumps(value: Any) -> str:
    # orjson: the same compact JSON (only tiny exponents are spelled 1e-7, not 1e-07),
    # a fifth of the time on the ingest path.
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # text that is not UTF-8 (a lone surrogate)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=False)


def _dumps_input(value: Any) -> str:
    # Frotcom's JSON may carry lone surrogates ("\ud800"), which Python decodes but
    # cannot encode as UTF-8 for SQLite; escaped ASCII keeps every input storable.
    # orjson writes the same JSON for ASCII-only input (exponents spelled 1e-7, not
    # 1e-07), ten times faster, and nearly every position is ASCII; the rest, and what
    # orjson refuses (surrogates, integers beyond 64 bits, deep nesting), goes through
    # the json module as before.
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    else:
        if text.isascii():
            return text.decode()
    return json.dumps(value, separators=(",", ":"))


def fingerprint(vehicle_id: str | None, raw: Any) -> str:
    canonical = json.dumps([vehicle_id, raw], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def batch_job(
    batch: Batch,
    vehicles: Mapping[str, str],
    provider: str,
    received_ms: int,
    states: VehicleStates | None = None,
) -> BatchJob:
    """The write job that stores one request's positions and quarantined input.

    ``states``: the writer's cache of committed vehicle states; without one, every
    group reads its vehicles' states from the database.
    """
    return BatchJob(batch, vehicles, provider, received_ms, states)


class BatchJob:
    """One request's rows, prepared on the loop; called (or combined) in the writer's thread.

    Everything that does not depend on the vehicles' stored state (the events, both
    JSON texts) is made here, on the loop, so the writer holds its lock only for the
    SQL: read the states, decide event types, insert.
    """

    def __init__(
        self,
        batch: Batch,
        vehicles: Mapping[str, str],
        provider: str,
        received_ms: int,
        states: VehicleStates | None = None,
    ) -> None:
        self.states = states
        received_at = self.received_at = format_ms(received_ms)
        self.positions = batch.count
        self.rejected = len(batch.rejected)
        self.by_vehicle: dict[str, _VehicleRows] = {}
        compiled = (
            batch.rows(provider, received_at, vehicles) if isinstance(batch, Documented) else None
        )
        if compiled is not None:
            # relay/_rows.c made the same rows in C (tests/test_rows.py holds it to that).
            for vehicle_id, held, moments, rows, values, steady in compiled:
                self.by_vehicle[vehicle_id] = _VehicleRows(held, moments, rows, values, steady)
        else:
            self._rows_in_python(batch.positions, vehicles, provider, received_at)
        self.mapped = frozenset(v for v, group in self.by_vehicle.items() if not group.held)
        self.quarantined = [
            (
                received_at,
                r.vehicle_id,
                r.reason,
                _dumps_input(r.raw),
                fingerprint(r.vehicle_id, r.raw),
            )
            for r in batch.rejected
        ]

    def _rows_in_python(
        self,
        positions: Sequence[Position],
        vehicles: Mapping[str, str],
        provider: str,
        received_at: str,
    ) -> None:
        ordered = sorted(positions, key=_vehicle_then_time)
        for vehicle_id, group in itertools.groupby(ordered, key=_vehicle):
            run = list(group)
            held = vehicle_id not in vehicles
            status = "held" if held else "pending"
            self.by_vehicle[vehicle_id] = _VehicleRows.of(
                held,
                run,
                [
                    (
                        event_id(provider, vehicle_id, p.event_ts),
                        vehicle_id,
                        p.event_ts,
                        "PERIODIC",
                        status,
                        p.event_ts if p.event_ts > received_at else received_at,
                        received_at,
                        received_at,
                        _dumps(build_event(p, "PERIODIC", provider, received_at)),
                        _dumps_input(p.raw) if p.source is None else p.source,
                    )
                    for p in run
                ],
            )

    def __call__(self, conn: sqlite3.Connection) -> StoreResult:
        """This request alone: its own statements and its own counts of what was new.

        Reads the states from the file, not from the writer's cache: this runs in a
        savepoint after a ROLLBACK, which emptied the cache (relay.outbox.states).
        """
        pending, held, changed = self._typed(load_states(conn, list(self.by_vehicle)))
        stored_pending = insert_flat(conn, INSERT_POSITION, _WIDTH, pending)
        stored_held = insert_flat(conn, INSERT_POSITION, _WIDTH, held)
        insert_rows(conn, INSERT_QUARANTINE, self.quarantined)
        insert_rows(conn, UPSERT_STATE, list(changed.values()))
        return self._result(stored_pending, stored_held)

    @staticmethod
    def combine(conn: sqlite3.Connection, jobs: Sequence[BatchJob]) -> list[StoreResult]:
        """Several requests as one: one read of states, one INSERT, one UPSERT.

        Every statement from the writer's thread hands the GIL to the event loop and
        back, so a group of requests makes a handful of them, not a handful each. The
        per-request counts assume every position is new; when one is not (a re-sent
        batch), this raises Uncombinable and the writer runs each job on its own.
        """
        vehicle_ids = sorted({v for job in jobs for v in job.by_vehicle})
        cache = jobs[0].states
        states = load_states(conn, vehicle_ids) if cache is None else cache.load(conn, vehicle_ids)
        values: list[Any] = []
        quarantined: list[Sequence[Any]] = []
        changed: dict[str, tuple[str, str, int, str]] = {}
        results = []
        for job in jobs:  # in queue order: each sees the states the previous ones left
            pending, held, job_changed = job._typed(states)
            values += pending
            values += held
            quarantined += job.quarantined
            changed.update(job_changed)
            results.append(job._result(len(pending) // _WIDTH, len(held) // _WIDTH))
        if insert_flat(conn, INSERT_POSITION, _WIDTH, values) != len(values) // _WIDTH:
            raise Uncombinable("a position of the group is stored already")
        insert_rows(conn, INSERT_QUARANTINE, quarantined)
        insert_rows(conn, UPSERT_STATE, list(changed.values()))
        if cache is not None:
            cache.stage({v: states[v] for v in changed})
        return results

    def _typed(
        self, states: dict[str, VehicleState]
    ) -> tuple[list[Any], list[Any], dict[str, tuple[str, str, int, str]]]:
        """The rows' values with their event types (pending, held), and the states to store.

        Updates ``states`` with this request's positions. Runs in the writer's thread,
        where every step holds up a whole group: a steady run (the usual case) costs a
        look at its vehicle's state, not a pass over its rows.
        """
        pending: list[Any] = []
        held: list[Any] = []
        changed: dict[str, tuple[str, str, int, str]] = {}
        for vehicle_id, group in self.by_vehicle.items():
            state = states.get(vehicle_id)
            first_ts, ignition = group.moments[0]
            if group.steady and (
                state is None or (state.ignition == ignition and state.last_ts_ms < first_ts)
            ):
                # No ignition change, nothing late: all PERIODIC, the last one is newest.
                values = group.values
                new_state: VehicleState | None = VehicleState(group.moments[-1][0], ignition)
                last_ts: str | None = group.rows[-1][2]
            else:
                types, new_state = event_types(state, group.moments)
                values = group.values
                if types is not None:
                    values = list(
                        itertools.chain.from_iterable(
                            row if kind == "PERIODIC" else _retyped(row, kind)
                            for row, kind in zip(group.rows, types, strict=True)
                        )
                    )
                last_ts = None
                if new_state is not state and new_state is not None:
                    last_ts = format_ms(new_state.last_ts_ms)
            (held if group.held else pending).extend(values)
            if new_state is not None and last_ts is not None:
                states[vehicle_id] = new_state
                changed[vehicle_id] = (
                    vehicle_id,
                    last_ts,
                    int(new_state.ignition),
                    self.received_at,
                )
        return pending, held, changed

    def _result(self, stored_pending: int, stored_held: int) -> StoreResult:
        accepted = stored_pending + stored_held
        return StoreResult(
            accepted=accepted,
            duplicates=self.positions - accepted,
            held=stored_held,
            quarantined=self.rejected,
            vehicles=self.mapped if stored_pending else frozenset(),
        )


# Multi-row statements: "VALUES" is followed by as many row groups as there are rows
# (see writer.insert_rows).
INSERT_POSITION = (
    "INSERT OR IGNORE INTO positions (provider_event_id, vehicle_id, event_ts,"
    " event_type, status, next_attempt_at, received_at, updated_at, payload, source)"
    " VALUES {rows}"
)
INSERT_QUARANTINE = (
    "INSERT OR IGNORE INTO quarantine (received_at, vehicle_id, reason, raw, fingerprint)"
    " VALUES {rows}"
)
UPSERT_STATE = (
    "INSERT INTO vehicle_state (vehicle_id, last_ts, ignition, updated_at)"
    " VALUES {rows} ON CONFLICT (vehicle_id) DO UPDATE SET"
    " last_ts = excluded.last_ts, ignition = excluded.ignition,"
    " updated_at = excluded.updated_at"
)


def _vehicle_then_time(p: Position) -> tuple[str, int]:
    return p.vehicle_id, p.ts_ms


def _vehicle(p: Position) -> str:
    return p.vehicle_id


@dataclass(slots=True)
class _VehicleRows:
    """One vehicle's rows of a request, in time order, before event types are known."""

    held: bool
    moments: list[tuple[int, bool]]  # (ts_ms, ignition) of each row, for event_types
    rows: list[tuple[Any, ...]]
    values: list[Any]  # the rows end to end: what the INSERT binds, made off the writer
    steady: bool  # strictly increasing in time, one ignition throughout

    @classmethod
    def of(cls, held: bool, run: Sequence[Position], rows: list[tuple[Any, ...]]) -> _VehicleRows:
        ignition = run[0].ignition
        steady = all(p.ignition is ignition for p in run) and all(
            a.ts_ms < b.ts_ms for a, b in itertools.pairwise(run)
        )
        return cls(
            held,
            [(p.ts_ms, p.ignition) for p in run],
            rows,
            list(itertools.chain.from_iterable(rows)),
            steady,
        )


_PERIODIC = '{"event_type":"PERIODIC",'


def _retyped(row: tuple[Any, ...], event_type: str) -> tuple[Any, ...]:
    # event_type is the payload's first key (build_event): only its value changes, so
    # the text is what encoding the retyped event would give, without keeping every
    # event's dict around for the rare ignition change.
    payload: str = row[8]
    if not payload.startswith(_PERIODIC):
        raise ValueError(f"payload does not start with {_PERIODIC!r}")
    retyped = f'{{"event_type":"{event_type}",{payload[len(_PERIODIC) :]}'
    return (*row[:3], event_type, *row[4:8], retyped, row[9])
