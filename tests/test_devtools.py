"""The stand-ins for both vendors: the fake Cartrack server and the Frotcom fleet simulator."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay.devtools.fake_cartrack import (
    VIN_RE,
    FakeCartrack,
    Response,
    run_fake_cartrack,
    validate_event,
)
from relay.devtools.simulator import (
    FleetSimulator,
    SimulatorStats,
    fleet,
    simulate,
    vin_for,
)

NOW = datetime(2026, 1, 19, 8, 43, 0, tzinfo=UTC)
KEY = "secret-key"
VIN = "ABC12345678901234"
OTHER_VIN = "WDB9634031L123456"
# SPEC §2, verbatim.
SPEC_EVENT: dict[str, Any] = {
    "event_type": "PERIODIC",
    "event_ts": "2026-01-19T08:42:15Z",
    "chassis_number": "ABC12345678901234",
    "source": {
        "provider": "frotcom",
        "device_id": "9876543",
        "provider_event_id": "frotcom:9876543:2026-01-19T08:42:15.000Z",
        "provider_received_ts": "2026-01-19T08:42:18Z",
    },
    "position": {"latitude": 1.3521, "longitude": 103.8198, "altitude": 15},
    "telemetry": {"speed": 54, "ignition": True, "rpm": 2200, "odometer": 45231.4},
}


def event(event_id: str = "frotcom:9876543:2026-01-19T08:42:15.000Z", **top: Any) -> dict[str, Any]:
    """The SPEC example with another idempotency key and top-level overrides."""
    result = copy.deepcopy(SPEC_EVENT)
    result["source"]["provider_event_id"] = event_id
    result.update(top)
    return result


def mutated(path: str, value: Any = ..., *, delete: bool = False) -> dict[str, Any]:
    """The SPEC example with the dotted ``path`` set to ``value`` or deleted."""
    result = copy.deepcopy(SPEC_EVENT)
    *parents, leaf = path.split(".")
    target = result
    for key in parents:
        target = target[key]
    if delete:
        del target[leaf]
    else:
        target[leaf] = value
    return result


# ---------------------------------------------------------------- validate_event


def test_spec_example_is_valid() -> None:
    assert validate_event(SPEC_EVENT, NOW) == []


@pytest.mark.parametrize(
    "candidate",
    [
        pytest.param(mutated("telemetry", delete=True), id="no-telemetry"),
        pytest.param(mutated("telemetry.rpm", delete=True), id="no-rpm"),
        pytest.param(mutated("position.altitude", delete=True), id="no-altitude"),
        pytest.param(mutated("source.device_id", delete=True), id="no-device-id"),
        pytest.param(mutated("event_ts", "2026-01-19T08:42:15.087Z"), id="milliseconds"),
        pytest.param(mutated("event_ts", "2026-01-19T08:43:59Z"), id="within-tolerance"),
        pytest.param(mutated("event_type", "IGNITION_OFF"), id="ignition-off"),
        pytest.param(mutated("position.latitude", -90), id="latitude-bound"),
        pytest.param(mutated("telemetry.speed", 0), id="speed-zero"),
    ],
)
def test_valid_variants(candidate: dict[str, Any]) -> None:
    assert validate_event(candidate, NOW) == []


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (mutated("event_type", "MOVING"), "event_type: must be one of"),
        (mutated("event_type", delete=True), "event_type: required"),
        (mutated("event_ts", delete=True), "event_ts: required"),
        (mutated("event_ts", "2026-01-19T08:42:15+00:00"), "event_ts: must be ISO-8601 UTC"),
        (mutated("event_ts", "2026-01-19 08:42:15Z"), "event_ts: must be ISO-8601 UTC"),
        (mutated("event_ts", "2026-13-19T08:42:15Z"), "event_ts: must be ISO-8601 UTC"),
        (mutated("event_ts", 1768812135), "event_ts: must be ISO-8601 UTC"),
        (mutated("event_ts", "2026-01-19T08:44:01Z"), "event_ts: in the future"),
        (mutated("chassis_number", "ABC1234567890123"), "chassis_number: must be exactly 17"),
        (mutated("chassis_number", "ABC1234567890123I"), "chassis_number: invalid VIN"),
        (mutated("chassis_number", "abc12345678901234"), "chassis_number: invalid VIN"),
        (mutated("chassis_number", 12345678901234567), "chassis_number: must be a string"),
        (mutated("chassis_number", delete=True), "chassis_number: required"),
        (mutated("source", delete=True), "source: required"),
        (mutated("source", "frotcom"), "source: must be an object"),
        (mutated("source.provider", delete=True), "source.provider: required"),
        (mutated("source.provider", ""), "source.provider: must be a non-empty string"),
        (mutated("source.device_id", 9876543), "source.device_id: must be a non-empty string"),
        (mutated("source.provider_event_id", None), "source.provider_event_id: must be"),
        (mutated("source.provider_received_ts", "now"), "source.provider_received_ts: must be"),
        (mutated("position", delete=True), "position: required"),
        (mutated("position.latitude", delete=True), "position.latitude: required"),
        (mutated("position.latitude", 90.5), "position.latitude: must be <= 90"),
        (mutated("position.longitude", -180.01), "position.longitude: must be >= -180"),
        (mutated("position.latitude", True), "position.latitude: must be a number"),
        (mutated("position.longitude", "103.8"), "position.longitude: must be a number"),
        (mutated("position.latitude", math.nan), "position.latitude: must be a finite number"),
        (mutated("position.altitude", math.inf), "position.altitude: must be a finite number"),
        (mutated("telemetry", None), "telemetry: must be an object"),
        (mutated("telemetry.odometer", delete=True), "telemetry.odometer: required when telemetry"),
        (mutated("telemetry.speed", delete=True), "telemetry.speed: required when telemetry"),
        (mutated("telemetry.ignition", delete=True), "telemetry.ignition: required when telemetry"),
        (mutated("telemetry.speed", -1), "telemetry.speed: must be >= 0"),
        (mutated("telemetry.odometer", math.nan), "telemetry.odometer: must be a finite number"),
        (mutated("telemetry.ignition", 1), "telemetry.ignition: must be a boolean"),
        (mutated("telemetry.rpm", False), "telemetry.rpm: must be a number"),
        (mutated("heading", 20), "unexpected key: heading"),
        (mutated("position.heading", 20.0), "unexpected key: position.heading"),
        (mutated("source.license_plate", "AA"), "unexpected key: source.license_plate"),
        (mutated("telemetry.direction", 20), "unexpected key: telemetry.direction"),
    ],
)
def test_each_violation_is_reported_by_field(candidate: dict[str, Any], expected: str) -> None:
    errors = validate_event(candidate, NOW)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected)


def test_non_object_event() -> None:
    assert validate_event([SPEC_EVENT], NOW) == ["event: must be an object"]


def test_every_error_is_listed() -> None:
    bad = mutated("telemetry", {"speed": 54})
    bad["position"] = {"latitude": 200, "longitude": 0, "bearing": 1}
    errors = validate_event(bad, NOW)
    assert set(errors) == {
        "telemetry.ignition: required when telemetry is present",
        "telemetry.odometer: required when telemetry is present",
        "position.latitude: must be <= 90",
        "unexpected key: position.bearing",
    }


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(value=JSON, where=st.sampled_from(["", "source", "position", "telemetry"]))
def test_arbitrary_json_never_crashes_the_validator(value: Any, where: str) -> None:
    # The fake must answer 422 with details for anything the relay might send, never a 500.
    candidate = mutated(where, value) if where else value
    errors = validate_event(candidate, NOW)
    assert all(isinstance(e, str) and ": " in e for e in errors)
    if where:
        assert errors or isinstance(value, dict)


def test_tolerance_and_naive_now() -> None:
    ahead = mutated("event_ts", "2026-01-19T08:45:00Z")
    assert validate_event(ahead, NOW, tolerance=timedelta(minutes=5)) == []
    assert validate_event(ahead, NOW.replace(tzinfo=None)) == ["event_ts: in the future"]


# ---------------------------------------------------------------- FakeCartrack server


@pytest.fixture
async def fake() -> AsyncIterator[FakeCartrack]:
    server = FakeCartrack(api_key=KEY, vins={VIN}, clock=lambda: NOW)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(
    http: aiohttp.ClientSession, url: str, body: Any, key: str | None = KEY
) -> tuple[int, Any]:
    headers = {} if key is None else {"X-API-KEY": key}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers) as response:
        return response.status, await response.json()


async def test_start_returns_ingest_url(fake: FakeCartrack) -> None:
    assert fake.url is not None
    assert fake.port
    assert fake.url == f"http://127.0.0.1:{fake.port}/api/data/ingest/telematics"


async def test_accepts_and_records(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    status, body = await send(http, fake.url, SPEC_EVENT)
    assert status == 202
    assert body["status"] == "accepted"
    assert body["id"]
    assert fake.accepted == [SPEC_EVENT]
    assert fake.ids() == [SPEC_EVENT["source"]["provider_event_id"]]
    [received] = fake.requests
    assert received.status == 202
    assert received.event == SPEC_EVENT
    assert json.loads(received.body) == SPEC_EVENT
    assert received.headers["X-API-KEY"] == KEY
    assert fake.stats[202] == 1


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
async def test_rejects_missing_or_wrong_key(
    fake: FakeCartrack, http: aiohttp.ClientSession, key: str | None
) -> None:
    assert fake.url
    status, body = await send(http, fake.url, SPEC_EVENT, key=key)
    assert status == 401
    assert "error" in body
    assert fake.accepted == []
    assert fake.requests[0].status == 401


async def test_any_key_when_unconfigured_but_never_none(http: aiohttp.ClientSession) -> None:
    async with FakeCartrack() as open_fake:
        assert open_fake.url
        assert (await send(http, open_fake.url, event("a"), key="whatever"))[0] == 202
        assert (await send(http, open_fake.url, event("b"), key=None))[0] == 401


async def test_body_not_json(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    status, body = await send(http, fake.url, b"{not json")
    assert status == 400
    assert body["detail"]
    assert fake.requests[0].event is None


async def test_validation_errors_come_back_with_details(
    fake: FakeCartrack, http: aiohttp.ClientSession
) -> None:
    assert fake.url
    status, body = await send(http, fake.url, mutated("telemetry.odometer", delete=True))
    assert status == 422
    assert body == {
        "error": "validation failed",
        "details": ["telemetry.odometer: required when telemetry is present"],
    }
    assert fake.requests[0].errors == body["details"]


async def test_unknown_vehicle(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    status, body = await send(http, fake.url, event(chassis_number=OTHER_VIN))
    assert status == 404
    assert body["error"] == "vehicle not found"


async def test_duplicate_id_is_409(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    assert (await send(http, fake.url, event("x")))[0] == 202
    status, body = await send(http, fake.url, event("x"))
    assert status == 409
    assert body["error"] == "duplicate event"
    assert fake.duplicates == 1
    assert fake.ids() == ["x"]
    assert fake.stats == {202: 1, 409: 1}


async def test_scripted_then_normal(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    fake.script(Response(503, headers={"Retry-After": "7"}), 429, lambda _event: None)
    async with http.post(fake.url, json=event("a"), headers={"X-API-KEY": KEY}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["error"] == "Service Unavailable"
    assert (await send(http, fake.url, event("a")))[0] == 429
    # A callable that declines consumes its slot and falls through to normal validation.
    assert (await send(http, fake.url, event("a")))[0] == 202
    assert (await send(http, fake.url, event("b")))[0] == 202
    assert [r.status for r in fake.requests] == [503, 429, 202, 202]
    assert fake.ids() == ["a", "b"]


async def test_scripted_body_and_callable(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    seen: list[dict[str, Any] | None] = []

    def teapot(payload: dict[str, Any] | None) -> Response:
        seen.append(payload)
        return Response(418, body="short and stout")

    fake.script(teapot)
    async with http.post(fake.url, json=event("t"), headers={"X-API-KEY": KEY}) as response:
        assert response.status == 418
        assert await response.text() == "short and stout"
    assert seen == [event("t")]


async def test_drop_closes_the_connection(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    fake.script(Response(500, drop=True))
    with pytest.raises(aiohttp.ClientConnectionError):
        await send(http, fake.url, event("d"))
    assert fake.requests[0].status == 0
    assert fake.accepted == []
    # The next request is served normally, on a fresh connection.
    assert (await send(http, fake.url, event("d")))[0] == 202


async def test_slow_answer_was_still_committed(
    fake: FakeCartrack, http: aiohttp.ClientSession
) -> None:
    # The relay timing out does not mean Cartrack did not take it: the retry must see 409.
    assert fake.url
    fake.script(Response(202, delay=1.0))
    with pytest.raises(TimeoutError):
        async with http.post(
            fake.url,
            json=event("slow"),
            headers={"X-API-KEY": KEY},
            timeout=aiohttp.ClientTimeout(total=0.1),
        ):
            pass
    assert fake.ids() == ["slow"]
    assert (await send(http, fake.url, event("slow")))[0] == 409


async def test_set_default_rule(http: aiohttp.ClientSession) -> None:
    async with FakeCartrack(api_key=KEY) as server:
        assert server.url
        server.set_default(
            lambda e: (
                Response(404, {"error": "vehicle not found"})
                if e and e.get("chassis_number") == OTHER_VIN
                else None
            )
        )
        server.script(500)
        assert (await send(http, server.url, event("1")))[0] == 500  # script wins
        assert (await send(http, server.url, event("2", chassis_number=OTHER_VIN)))[0] == 404
        assert (await send(http, server.url, event("3", chassis_number=OTHER_VIN)))[0] == 404
        assert (await send(http, server.url, event("4")))[0] == 202
        server.set_default(None)
        assert (await send(http, server.url, event("5", chassis_number=OTHER_VIN)))[0] == 202


async def test_wait_for_wakes_on_requests(fake: FakeCartrack, http: aiohttp.ClientSession) -> None:
    assert fake.url
    url = fake.url

    async def producer() -> None:
        for n in range(3):
            await send(http, url, event(f"w{n}"))

    task = asyncio.create_task(producer())
    await fake.wait_for(lambda f: len(f.accepted) == 3, timeout=5)
    await task
    assert fake.ids() == ["w0", "w1", "w2"]


async def test_wait_for_times_out_with_counts(
    fake: FakeCartrack, http: aiohttp.ClientSession
) -> None:
    assert fake.url
    await send(http, fake.url, b"nope")
    with pytest.raises(TimeoutError, match=r"1 requests, 0 accepted.*400: 1"):
        await fake.wait_for(lambda f: len(f.accepted) > 0, timeout=0.05)


async def test_latency_delays_answers(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with FakeCartrack(latency=0.2) as slow:
        assert slow.url
        started = loop.time()
        assert (await send(http, slow.url, event(), key="k"))[0] == 202
        assert loop.time() - started >= 0.2


async def test_start_twice_is_an_error(fake: FakeCartrack) -> None:
    with pytest.raises(RuntimeError):
        await fake.start()
    await fake.stop()
    await fake.stop()  # idempotent


async def test_run_fake_cartrack_logs_url_and_rejections(http: aiohttp.ClientSession) -> None:
    listening = asyncio.Event()

    def watch(_logger: Any, _method: str, event_dict: Any) -> Any:
        if event_dict["event"] == "fake_cartrack_listening":
            listening.set()
        return event_dict

    stop = asyncio.Event()
    with capture_logs(processors=[watch]) as logs:
        task = asyncio.create_task(run_fake_cartrack("127.0.0.1", 0, KEY, stop))
        async with asyncio.timeout(5):
            await listening.wait()
        url = next(e["url"] for e in logs if e["event"] == "fake_cartrack_listening")
        fresh = event(event_ts="2000-01-01T00:00:00Z")
        assert (await send(http, url, fresh))[0] == 202
        assert (await send(http, url, mutated("position.heading", 1)))[0] == 422
        stop.set()
        await task
    rejected = [e for e in logs if e["event"] == "fake_cartrack_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["status"] == 422
    assert rejected[0]["errors"] == ["unexpected key: position.heading"]
    assert KEY not in repr(logs)


# ---------------------------------------------------------------- Frotcom simulator

ISO_MS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
POSITION_KEYS = {"Timestamp", "Latitude", "Longitude", "Speed", "Direction", "Ignition"}
T0 = datetime(2026, 1, 19, 8, 0, tzinfo=UTC)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def run_fleet(
    vehicles: int, batches: int, seconds: float = 60.0, seed: int = 0, **kwargs: Any
) -> tuple[FleetSimulator, list[tuple[datetime, dict[str, Any]]]]:
    clock = Clock()
    sim = FleetSimulator(vehicles, seed=seed, clock=clock, **kwargs)
    out = []
    for _ in range(batches):
        now = clock.advance(seconds)
        out.append((now, sim.next_batch(seconds)))
    return sim, out


def tracks(batches: list[tuple[datetime, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    by_vehicle: dict[str, list[dict[str, Any]]] = {}
    for _, body in batches:
        for message in body["PvtMessages"]:
            by_vehicle.setdefault(message["VehicleID"], []).extend(message["Positions"])
    return by_vehicle


def bearing(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(metres, degrees clockwise from north) from position a to b."""
    north = (b["Latitude"] - a["Latitude"]) * 111_320.0
    east = (b["Longitude"] - a["Longitude"]) * 111_320.0 * math.cos(math.radians(b["Latitude"]))
    return math.hypot(north, east), math.degrees(math.atan2(east, north)) % 360.0


def test_batch_shape_follows_spec_section_1() -> None:
    sim, batches = run_fleet(12, 30)
    for now, body in batches:
        assert set(body) == {"PvtMessages"}
        assert body["PvtMessages"], "every vehicle reports at least once per batch"
        for message in body["PvtMessages"]:
            assert set(message) == {"VehicleID", "LicensePlate", "Positions"}
            assert isinstance(message["VehicleID"], str)
            assert isinstance(message["LicensePlate"], str)
            assert message["LicensePlate"]
            assert message["Positions"]
            for p in message["Positions"]:
                assert POSITION_KEYS <= set(p) <= POSITION_KEYS | {"Odometer"}
                assert ISO_MS_RE.fullmatch(p["Timestamp"])
                assert now - timedelta(seconds=60) < parse_ts(p["Timestamp"]) <= now
                assert -90 <= p["Latitude"] <= 90
                assert -180 <= p["Longitude"] <= 180
                assert 0 <= p["Speed"] <= 140
                assert 0 <= p["Direction"] < 360
                assert isinstance(p["Ignition"], bool)
                if not p["Ignition"]:
                    assert p["Speed"] == 0
    assert sim.positions_generated == sum(len(t) for t in tracks(batches).values())


def test_tracks_are_plausible() -> None:
    _, batches = run_fleet(12, 120)
    transitions: set[tuple[bool, bool]] = set()
    with_odometer = 0
    for track in tracks(batches).values():
        stamps = [parse_ts(p["Timestamp"]) for p in track]
        assert stamps == sorted(stamps)
        assert len(set(stamps)) == len(stamps), "timestamps strictly increasing per vehicle"
        odometers = [p["Odometer"] for p in track if "Odometer" in p]
        assert len(odometers) in (0, len(track))
        with_odometer += bool(odometers)
        assert odometers == sorted(odometers)
        for a, b in itertools.pairwise(track):
            transitions.add((a["Ignition"], b["Ignition"]))
            metres, heading = bearing(a, b)
            seconds = (parse_ts(b["Timestamp"]) - parse_ts(a["Timestamp"])).total_seconds()
            # Never faster than the faster of the two reported speeds (plus rounding).
            assert metres / max(seconds, 1e-3) * 3.6 <= max(a["Speed"], b["Speed"]) + 2
            if metres > 30:
                turn = (heading - b["Direction"] + 180) % 360 - 180
                assert abs(turn) < 2, (a, b)
            if odometers:
                assert b["Odometer"] - a["Odometer"] <= metres / 1000 + 0.2
    assert (True, False) in transitions, "some vehicle parks"
    assert (False, True) in transitions, "and drives off again"
    assert with_odometer == 6  # odometer_share=0.5 of 12


@pytest.mark.parametrize(("share", "expected"), [(0.0, 0), (0.25, 2), (1.0, 8)])
def test_odometer_share(share: float, expected: int) -> None:
    _, batches = run_fleet(8, 1, odometer_share=share)
    carrying = {
        m["VehicleID"]
        for m in batches[0][1]["PvtMessages"]
        if all("Odometer" in p for p in m["Positions"])
    }
    assert len(carrying) == expected


def test_deterministic_per_seed_and_clock() -> None:
    assert run_fleet(5, 10, seed=7)[1] == run_fleet(5, 10, seed=7)[1]
    assert run_fleet(5, 10, seed=7)[1] != run_fleet(5, 10, seed=8)[1]


def test_per_vehicle_and_idle_clock() -> None:
    clock = Clock()
    sim = FleetSimulator(3, clock=clock)
    clock.advance(60)
    body = sim.next_batch(60, per_vehicle=4)
    assert [len(m["Positions"]) for m in body["PvtMessages"]] == [4, 4, 4]
    # The clock did not move: nothing new, and never a repeated or future timestamp.
    assert sim.next_batch(60, per_vehicle=4) == {"PvtMessages": []}
    clock.advance(0.002)
    tiny = sim.next_batch(60, per_vehicle=5)
    assert [len(m["Positions"]) for m in tiny["PvtMessages"]] == [2, 2, 2]
    assert max(p["Timestamp"] for m in tiny["PvtMessages"] for p in m["Positions"]) <= (
        clock.now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
    )


def iso3779_check_digit(vin: str) -> str:
    values = {
        c: v
        for v, chars in enumerate(["", "AJ", "BKS", "CLT", "DMU", "ENV", "FW", "GPX", "HY", "RZ"])
        for c in chars
    }
    weights = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
    total = sum(
        (int(c) if c.isdigit() else values[c]) * w for c, w in zip(vin, weights, strict=True)
    )
    return "X" if total % 11 == 10 else str(total % 11)


def test_vins_are_valid_unique_and_stable() -> None:
    vins = fleet(2000)
    assert list(vins)[:2] == ["9000001", "9000002"]
    assert len(set(vins.values())) == 2000
    for vid, vin in vins.items():
        assert VIN_RE.fullmatch(vin)
        assert vin[8] == iso3779_check_digit(vin)
        assert vin == vin_for(vid)
    assert VIN_RE.fullmatch(vin_for("truck-b"))
    assert VIN_RE.fullmatch(vin_for("\u0663\u0664"))  # non-ASCII digits
    assert fleet(2, first_id=5) == {"5": vin_for("5"), "6": vin_for("6")}


# ---------------------------------------------------------------- simulate()


class Receiver:
    """A tiny local Frotcom webhook: records (headers, body), answers scripted statuses."""

    def __init__(self) -> None:
        self.url = ""
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.arrived = asyncio.Event()
        self.stop_after: int | None = None
        self.stop = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if self.stop_after is not None and len(self.received) >= self.stop_after:
            self.stop.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"status": "success" if status == 200 else "error"}, status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/frotcom", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/frotcom"
    try:
        yield hook
    finally:
        await runner.cleanup()


async def test_simulate_resends_the_failed_batch(receiver: Receiver) -> None:
    received = receiver.received
    receiver.statuses.append(500)
    receiver.stop_after = 4
    stats = await simulate(
        receiver.url, "1234-5678", vehicles=3, interval=0.05, duration=10, stop=receiver.stop
    )
    assert len(received) == 4
    assert received[0][1] == received[1][1], "re-sent byte for byte"
    assert received[1][1] != received[2][1]
    assert all(headers["Authorization"] == "1234-5678" for headers, _ in received)
    assert all(headers["Content-Type"] == "application/json" for headers, _ in received)
    assert stats.failed == 1
    assert stats.ok == 3
    assert stats.statuses == {500: 1, 200: 3}
    assert stats.batches == 3
    assert stats.last_error is not None
    assert stats.last_error.startswith("HTTP 500")
    seen: dict[str, list[str]] = {}
    for _, body in received[1:]:
        for message in json.loads(body)["PvtMessages"]:
            seen.setdefault(message["VehicleID"], []).extend(
                p["Timestamp"] for p in message["Positions"]
            )
    assert set(seen) == set(fleet(3))
    for stamps in seen.values():
        assert stamps == sorted(set(stamps)), "accepted batches never overlap"
    assert stats.positions == sum(len(s) for s in seen.values())


async def test_simulate_stops_after_duration(receiver: Receiver) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    stats = await simulate(receiver.url, "tok", vehicles=2, interval=0.05, duration=0.3)
    assert loop.time() - started < 0.3 + 1.0
    assert 1 <= len(receiver.received) <= round(0.3 / 0.05) + 1
    assert stats.ok == len(receiver.received)
    assert stats.failed == 0


async def test_simulate_stops_on_event_and_keeps_a_given_session(receiver: Receiver) -> None:
    stop = asyncio.Event()
    stats = SimulatorStats()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(
            simulate(receiver.url, "tok", 2, 60.0, stop=stop, session=session, stats=stats)
        )
        async with asyncio.timeout(5):
            await receiver.arrived.wait()  # the first batch is posted at once
        stop.set()
        async with asyncio.timeout(1):
            result = await task
        assert result is stats
        assert stats.ok == 1
        assert not session.closed


async def test_simulate_counts_connection_failures() -> None:
    # A port that was just free and is now closed: connection refused, quickly.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/webhooks/frotcom"
    stats = await simulate(url, "tok", 1, 0.05, duration=0.1, batch_seconds=5)
    assert stats.ok == 0
    assert stats.failed >= 1
    assert stats.batches == 1, "the failed batch is retried, not replaced"
    assert stats.statuses == {0: stats.failed}
    assert stats.last_error


async def test_simulate_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        await simulate("http://127.0.0.1:9/", "tok", 1, 0)
