"""Cartrack misbehaving in every way at once, against the real app and the real fake server.

test_forwarder.py and test_forwarder_pause.py check each row of SPEC §2's response table on
its own; here the faults come mixed, as they do in production: a seeded plan gives every
event its own run of 500/502/503, 429 with Retry-After (delta-seconds and HTTP-date),
dropped connections and answers slower than ``cartrack.timeout_seconds``; one vehicle has
events Cartrack rejects (404, 422); a window of 401/403 pauses the relay; Cartrack goes away
entirely and comes back on the same port. Whatever the mix, the outcome must be the same:
every good event reaches Cartrack exactly once, exactly as SPEC §2 maps it, in time order
per vehicle; rejected events end ``failed`` with Cartrack's status and detail and are sent
again only after ``requeue``.

The seed is printed; ``RELAY_FAULT_SEED=<n>`` replays one mix.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import (
    BASE_MS,
    VEHICLES,
    A,
    B,
    C,
    Start,
    batch,
    position,
    post_batch,
    rows,
    wait_until,
)

from relay import admin
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Received, Response
from relay.state import STATE
from relay.timeutil import format_ms, parse_timestamp

TIMEOUT = 0.15  # cartrack.timeout_seconds: a "slow" answer takes twice as long
SEEDS = (
    [int(os.environ["RELAY_FAULT_SEED"])] if os.environ.get("RELAY_FAULT_SEED") else [1, 20261122]
)
# One vehicle's events that Cartrack rejects on first sight: (event index, status, body).
REJECTED = {
    2: (422, '{"error":"validation failed","details":["position.latitude: out of range"]}'),
    5: (404, '{"error":"vehicle not found","chassis_number":"JH4KA7561PC008269"}'),
}
TRANSIENT_FAULTS = ("500", "502", "503", "429-delta", "429-date", "drop", "slow-202", "slow-503")
# Drawn at random on top of one of each above; a 429 costs its lane a second, so they
# come only once each, which keeps the test's length bounded whatever the seed.
CHEAP_FAULTS = ("500", "502", "503", "drop", "slow-202", "slow-503")


def ts(i: int) -> str:
    return format_ms(BASE_MS + i * 1000)


def event_id(vehicle: str, i: int) -> str:
    return f"frotcom:{vehicle}:{ts(i)}"


def eid(event: object) -> str | None:
    if not isinstance(event, dict) or not isinstance(event.get("source"), dict):
        return None
    value = event["source"].get("provider_event_id")
    return value if isinstance(value, str) else None


def vehicle_of(event_id_: str) -> str:
    return event_id_.split(":")[1]


def index_of(event_id_: str) -> int:
    return (parse_timestamp(event_id_.split(":", 2)[2]) - BASE_MS) // 1000


@pytest.fixture
def start(start: Start) -> Start:
    """conftest's app with quick retries, a short Cartrack timeout and a 0.2 s rescan."""

    async def quick(rand: Callable[[], float] = random.random, **sections: Any) -> TestClient:
        sections.setdefault("retry", {"initial_seconds": 0.02, "max_seconds": 0.1})
        sections.setdefault("cartrack", {})
        sections["cartrack"] = {"timeout_seconds": TIMEOUT, **sections["cartrack"]}
        return await start(rescan_seconds=0.2, rand=rand, vehicles=VEHICLES, **sections)

    return quick


# -- the batches and the events SPEC §2 makes of them ------------------------------------------


def track(rng: random.Random, vehicle: str, n: int) -> list[dict[str, Any]]:
    """n positions, one second apart; ignition flips now and then, some carry an odometer."""
    ignition = rng.random() < 0.5
    out = []
    for i in range(n):
        if rng.random() < 0.3:
            ignition = not ignition
        extra = {"Odometer": round(1000 + i * 0.3, 1)} if rng.random() < 0.3 else {}
        out.append(
            position(
                ts(i),
                lat=round(rng.uniform(-90, 90), 5),
                lon=round(rng.uniform(-180, 180), 5),
                speed=round(rng.uniform(0, 130), 1),
                ignition=ignition,
                **extra,
            )
        )
    return out


def expected_events(vehicle: str, track_: list[dict[str, Any]], received: str) -> dict[str, Any]:
    """SPEC §2's event for each position of one vehicle's track (posted in time order)."""
    events: dict[str, Any] = {}
    previous: bool | None = None
    for i, p in enumerate(track_):
        if previous is None or previous == p["Ignition"]:
            event_type = "PERIODIC"
        else:
            event_type = "IGNITION_ON" if p["Ignition"] else "IGNITION_OFF"
        previous = p["Ignition"]
        event: dict[str, Any] = {
            "event_type": event_type,
            "event_ts": ts(i),
            "chassis_number": VEHICLES[vehicle],
            "source": {
                "provider": "frotcom",
                "device_id": vehicle,
                "provider_event_id": event_id(vehicle, i),
                "provider_received_ts": received,
            },
            "position": {"latitude": p["Latitude"], "longitude": p["Longitude"]},
        }
        if "Odometer" in p:
            event["telemetry"] = {
                "speed": p["Speed"],
                "ignition": p["Ignition"],
                "odometer": p["Odometer"],
            }
        events[event_id(vehicle, i)] = event
    return events


# -- the scripted Cartrack -----------------------------------------------------------------------


@dataclass
class FaultPlan:
    """Per event, the answers Cartrack gives before behaving normally.

    The plan is drawn from the seed before anything is sent, so which event suffers what
    does not depend on the order in which concurrent lanes happen to reach the fake.
    """

    seed: int
    plans: dict[str, list[str]] = field(default_factory=dict)
    # Index of the request in FakeCartrack.requests -> earliest time of the next request
    # for that vehicle, for answers that carried a Retry-After.
    not_before: dict[int, float] = field(default_factory=dict)
    drawn: Counter[str] = field(default_factory=Counter)
    stored: set[str] = field(default_factory=set)
    calls: int = 0

    def prepare(self, event_ids: list[str]) -> None:
        rng = random.Random(self.seed)
        for key in sorted(event_ids):
            index = index_of(key)
            if vehicle_of(key) == C and index in REJECTED:
                self.plans[key] = [f"reject-{index}"]
            else:
                n = rng.choice([0, 0, 1, 1, 2, 3])
                self.plans[key] = [rng.choice(CHEAP_FAULTS) for _ in range(n)]
        # Every kind of fault at least once, whatever the seed.
        transient = sorted(k for k, p in self.plans.items() if not p or "reject" not in p[0])
        for fault, key in zip(
            TRANSIENT_FAULTS, rng.sample(transient, len(TRANSIENT_FAULTS)), strict=True
        ):
            self.plans[key].insert(0, fault)
        for p in self.plans.values():
            self.drawn.update(p)

    def __call__(self, event: dict[str, Any] | None) -> Response | None:
        # Called once per request, in arrival order: call k is FakeCartrack.requests[k].
        index, self.calls = self.calls, self.calls + 1
        key = eid(event)
        if key is None:
            return None
        plan = self.plans.get(key)
        if not plan:
            return None  # normal: validate, 202 (or 409 for an id already accepted)
        fault = plan.pop(0)
        now = time.time()
        if fault == "429-delta":
            self.not_before[index] = now + 1
            return Response(429, headers={"Retry-After": "1"})
        if fault == "429-date":
            when = math.ceil(now) + 1  # HTTP-dates have whole seconds
            self.not_before[index] = when
            return Response(429, headers={"Retry-After": email.utils.formatdate(when, usegmt=True)})
        if fault == "drop":
            return Response(502, drop=True)
        if fault == "slow-202":  # Cartrack stored it; the relay timed out: the retry gets 409
            # Stored once only: a real Cartrack answers an id it already holds with 409.
            status = 409 if key in self.stored else 202
            self.stored.add(key)
            return Response(status, delay=TIMEOUT * 2)
        if fault == "slow-503":
            return Response(503, delay=TIMEOUT * 2)
        if fault.startswith("reject-"):
            status, body = REJECTED[int(fault.removeprefix("reject-"))]
            return Response(status, body=body)
        return Response(int(fault))


def requests_for(fake: FakeCartrack, key: str) -> list[Received]:
    return [r for r in fake.requests if eid(r.event) == key]


def settled(db: Path, total: int, failed: int) -> Callable[[], bool]:
    def check() -> bool:
        found = Counter(r["status"] for r in rows(db))
        return found == Counter({"sent": total - failed, "failed": failed})

    return check


# -- a seeded mix of transient faults and rejections -----------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_seeded_fault_mix_delivers_every_good_event_exactly_once_as_mapped(
    start: Start,
    cartrack: FakeCartrack,
    db_path: Path,
    make_config: Callable[..., Config],
    seed: int,
) -> None:
    print(f"fault mix seed: {seed} (replay with RELAY_FAULT_SEED={seed})", file=sys.stderr)
    rng = random.Random(seed)
    plan = FaultPlan(seed)
    tracks = {vehicle: track(rng, vehicle, 8) for vehicle in VEHICLES}
    plan.prepare([event_id(vehicle, i) for vehicle in VEHICLES for i in range(8)])
    print(f"faults planned: {sorted(plan.drawn.items())}", file=sys.stderr)
    cartrack.set_default(plan)
    client = await start()
    status, body = await post_batch(client, batch(*tracks.items()))
    assert (status, body["accepted"], body["quarantined"]) == (200, 24, 0), body
    received = rows(db_path)[0]["received_at"]
    expected: dict[str, Any] = {}
    for vehicle, positions in tracks.items():
        expected |= expected_events(vehicle, positions, received)
    rejected_ids = {event_id(C, i) for i in REJECTED}

    await wait_until(settled(db_path, 24, len(REJECTED)), timeout=30)
    assert not any(plan.plans.values()), "a planned fault was never served"

    # Rejected: failed with Cartrack's status and body, asked once, never retried.
    failed = {r["provider_event_id"]: r for r in rows(db_path, "status = 'failed'")}
    assert set(failed) == rejected_ids
    for i, (code, detail) in REJECTED.items():
        row = failed[event_id(C, i)]
        assert (row["last_status"], row["last_error"], row["attempts"]) == (code, detail, 1)
        assert row["sent_at"] is None
        assert len(requests_for(cartrack, event_id(C, i))) == 1

    # Good events: each accepted exactly once, exactly as mapped, in time order per vehicle.
    accepted_ids = cartrack.ids()
    assert len(accepted_ids) == len(set(accepted_ids)) == 24 - len(REJECTED)
    for event in cartrack.accepted:
        key = eid(event)
        assert key is not None
        assert event == expected[key]
    for vehicle in VEHICLES:
        mine = [k for k in accepted_ids if vehicle_of(k) == vehicle]
        assert mine == sorted(k for k in expected if vehicle_of(k) == vehicle and k not in failed)
    for row in rows(db_path, "status = 'sent'"):
        attempts = requests_for(cartrack, row["provider_event_id"])
        assert row["attempts"] == len(attempts)
        assert row["last_status"] in (202, 409)
        assert row["last_error"] is None
        # Only after a slow 202 (stored by Cartrack, timed out for us) may the answer be 409.
        assert (row["last_status"] == 409) == any(r.status == 202 for r in attempts[:-1]), row[
            "provider_event_id"
        ]
    assert all(r.errors == [] for r in cartrack.requests), "the fake found an invalid event"

    # Retry-After is a minimum: the vehicle's next request never came sooner.
    requests = list(cartrack.requests)
    for index, earliest in plan.not_before.items():
        vehicle = vehicle_of(eid(requests[index].event) or "")
        later = [r for r in requests[index + 1 :] if vehicle_of(eid(r.event) or "::") == vehicle]
        assert later, f"request {index} was never retried"
        assert later[0].time >= earliest, (index, later[0].time - earliest)

    # The operator requeues the dead letters (Cartrack now takes them): delivered once more.
    config = make_config(url=cartrack.url, vehicles=VEHICLES)
    result = await asyncio.to_thread(admin.requeue, config)
    assert (result.pending, result.held) == (len(REJECTED), 0)
    await wait_until(settled(db_path, 24, 0), timeout=10)
    assert sorted(cartrack.ids()) == sorted(expected)
    assert len(cartrack.ids()) == 24
    for key in rejected_ids:
        first_status = REJECTED[index_of(key)][0]
        assert [r.status for r in requests_for(cartrack, key)] == [first_status, 202]
        assert cartrack.accepted[cartrack.ids().index(key)] == expected[key]


# -- 401/403: pause, probe, never dead-letter -------------------------------------------------------


async def test_auth_failure_window_pauses_with_a_handful_of_probes_and_loses_nothing(
    start: Start, cartrack: FakeCartrack, db_path: Path, logs: list[dict[str, Any]]
) -> None:
    seed = 401
    print(f"auth window seed: {seed}", file=sys.stderr)
    rng = random.Random(seed)
    cartrack.set_default(lambda event: Response(rng.choice([401, 403])))
    # rand = 1: every backoff is its ceiling (0.05, 0.1, 0.2, 0.2, ...): the bound is exact.
    client = await start(rand=lambda: 1.0, retry={"initial_seconds": 0.05, "max_seconds": 0.2})
    tracks = {vehicle: track(rng, vehicle, 20) for vehicle in VEHICLES}
    status, body = await post_batch(client, batch(*tracks.items()))
    assert (status, body["accepted"]) == (200, 60)
    await cartrack.wait_for(lambda f: len(f.requests) >= 1)
    window_start = time.time()

    # During the window the webhook still stores; /healthz says the forwarder is paused.
    later = batch((A, [position(ts(100 + i)) for i in range(5)]))
    status, body = await post_batch(client, later)
    assert (status, body["accepted"]) == (200, 5)
    await wait_until(lambda: client.app[STATE].forwarder.pause is not None)  # type: ignore[union-attr]
    health = await client.get("/healthz")
    assert (health.status, await health.json()) == (200, {"status": "ok", "forwarder": "paused"})
    await asyncio.sleep(1.0)  # the length of Cartrack's bad-key window, not a wait for a result
    in_window = len(cartrack.requests)
    window = time.time() - window_start
    cartrack.set_default(None)  # the key works again

    # A handful of probes: at most one request per vehicle before the pause, then one probe
    # at a time, 0.05 s after the pause began and then every 0.1, 0.2, 0.2 ... s. Without
    # the pause, each of the 3 lanes would retry its head row every <= 0.2 s on its own.
    most_probes = 1 + math.ceil(window / 0.1)
    assert len(VEHICLES) + 1 <= in_window <= len(VEHICLES) + most_probes, (in_window, window)
    rows_now = rows(db_path)
    assert {r["status"] for r in rows_now} == {"pending"}, "a row was dead-lettered for 401/403"

    await wait_until(settled(db_path, 65, 0), timeout=15)
    received = rows(db_path, "vehicle_id = ?", (B,))[0]["received_at"]
    expected = expected_events(B, tracks[B], received)
    assert [e for e in cartrack.accepted if e["source"]["device_id"] == B] == list(
        expected.values()
    )
    assert len(cartrack.ids()) == len(set(cartrack.ids())) == 65
    assert [e["event"] for e in logs if e["event"] == "forwarder_paused"] == ["forwarder_paused"]
    assert [e for e in logs if e["event"] == "event_rejected"] == []
    assert client.app[STATE].forwarder.pause is None  # type: ignore[union-attr]


# -- Cartrack down entirely, then back on the same port ----------------------------------------------


async def test_outage_then_the_backlog_drains_in_order_when_cartrack_returns(
    start: Start, cartrack: FakeCartrack, db_path: Path
) -> None:
    rng = random.Random(503)
    client = await start()
    before = {A: track(rng, A, 3)}
    status, _ = await post_batch(client, batch(*before.items()))
    assert status == 200
    await wait_until(settled(db_path, 3, 0))

    port = cartrack.port
    await cartrack.stop()  # connection refused from now on
    tracks = {vehicle: track(rng, vehicle, 12)[3:] for vehicle in VEHICLES}
    for chunk in range(3):  # Frotcom keeps sending, one minute at a time
        part = {v: t[chunk * 3 : chunk * 3 + 3] for v, t in tracks.items()}
        status, body = await post_batch(client, batch(*part.items()))
        assert (status, body["accepted"]) == (200, 9), body
    status, body = await post_batch(client, batch(*{v: t[:3] for v, t in tracks.items()}.items()))
    assert (status, body["accepted"], body["duplicates"]) == (200, 0, 9)  # a re-sent batch

    def retried_unanswered() -> bool:
        waiting = rows(db_path, "status = 'pending'")
        return len(waiting) == 27 and any(
            r["attempts"] >= 3 and r["last_status"] is None for r in waiting
        )

    await wait_until(retried_unanswered)
    assert all(
        r["last_error"] is None or r["last_error"].startswith("connection error")
        for r in rows(db_path, "status = 'pending'")
    )
    assert await cartrack.start(port=port) == cartrack.url  # back, same address

    await wait_until(settled(db_path, 30, 0), timeout=15)
    assert len(cartrack.ids()) == len(set(cartrack.ids())) == 30
    for vehicle in VEHICLES:
        mine = [k for k in cartrack.ids() if vehicle_of(k) == vehicle]
        assert mine == sorted(mine)
    assert all(r.errors == [] for r in cartrack.requests)
