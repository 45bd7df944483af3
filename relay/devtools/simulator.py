"""Frotcom's side of the relay: a deterministic fleet that produces PVT webhook batches (SPEC §1).

Vehicles drive around Iberian cities with plausible speeds, headings matching their movement,
ignition-off stops and (some) odometers, so a demo exercises every mapping rule of the relay.
``simulate`` posts batches like Frotcom: one per interval, the same one again after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# (name, latitude, longitude, plate style): vehicles stay within a city-sized radius.
_CITIES = (
    ("Lisbon", 38.7223, -9.1393, "PT"),
    ("Barcelona", 41.3874, 2.1686, "ES"),
    ("Porto", 41.1579, -8.6291, "PT"),
    ("Madrid", 40.4168, -3.7038, "ES"),
)
_CITY_RADIUS_M = 12_000.0
_METRES_PER_DEGREE = 111_320.0
# Frotcom-like reporting cadence: every 10-30 s while driving, rarely while parked.
_DRIVING_REPORT_S = (10.0, 30.0)
_PARKED_REPORT_S = 300.0
# A simulated POST waits as long as Frotcom plausibly would before counting a timeout.
POST_TIMEOUT_S = 30.0

# ISO 3779 check digit (position 9): transliteration values and positional weights.
_VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
_VIN_VALUES = dict(
    zip("ABCDEFGHJKLMNPRSTUVWXYZ", (*range(1, 9), *range(1, 6), 7, 9, *range(2, 10)), strict=True)
)
_MODEL_YEARS = "ABCDEFGHJKLMNPRSTVWXY123456789"
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
_PLATE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXZ"
_SPANISH_PLATE_LETTERS = "BCDFGHJKLMNPRSTVWXYZ"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def vin_for(vehicle_id: str) -> str:
    """A deterministic, valid 17-character VIN (with a correct check digit) for a vehicle."""
    digest = hashlib.sha256(f"cartrack-relay-sim:{vehicle_id}".encode()).digest()
    hashed = "".join(_VIN_ALPHABET[b % len(_VIN_ALPHABET)] for b in digest[:7])
    year = _MODEL_YEARS[digest[7] % len(_MODEL_YEARS)]
    # Numeric ids keep their last six digits as the serial, so consecutive ids stay unique.
    digits = "".join(ch for ch in vehicle_id if ch in "0123456789")
    hashed_serial = str(int.from_bytes(digest[8:16], "big"))[-6:]
    serial = (digits[-6:] if digits else hashed_serial).rjust(6, "0")
    # "SM" marks the simulator; "0" holds the place of the check digit computed below.
    vin = f"SM{hashed[:6]}0{year}{hashed[6]}{serial}"
    total = sum(
        (int(ch) if ch.isdigit() else _VIN_VALUES[ch]) * weight
        for ch, weight in zip(vin, _VIN_WEIGHTS, strict=True)
    )
    check = "X" if total % 11 == 10 else str(total % 11)
    return vin[:8] + check + vin[9:]


def fleet(n: int, first_id: int = 9_000_001) -> dict[str, str]:
    """VehicleID -> VIN for ``n`` simulated vehicles (the relay's ``[vehicles]`` table)."""
    return {str(vid): vin_for(str(vid)) for vid in range(first_id, first_id + n)}


def _iso_ms(t_ms: int) -> str:
    # Integer milliseconds avoid float rounding turning .087 into .086999.
    moment = _EPOCH + t_ms * _MS
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{t_ms % 1000:03d}Z"


def _plate(rng: random.Random, style: str) -> str:
    def letters(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    if style == "ES":  # Spain: 0000 BCD, consonants only
        return f"{rng.randrange(10_000):04d} {letters(_SPANISH_PLATE_LETTERS, 3)}"
    # Portugal since 2020: AA-00-AA
    return f"{letters(_PLATE_LETTERS, 2)}-{rng.randrange(100):02d}-{letters(_PLATE_LETTERS, 2)}"


@dataclass
class _Vehicle:
    vehicle_id: str
    plate: str
    rng: random.Random
    center: tuple[float, float]
    lat: float
    lon: float
    heading: float
    odometer: float | None
    report_every_s: float
    speed: float = 0.0
    cruise: float = 40.0
    ignition: bool = True
    parked_until_ms: int = 0
    last_ms: int | None = None  # instant of the last reported position
    next_ms: int | None = None  # when the natural cadence reports next
    seen_until_ms: int | None = None  # end of the last batch window: batches never overlap

    def advance(self, t_ms: int) -> dict[str, Any]:
        """Move the vehicle to instant ``t_ms`` and return its Frotcom position there."""
        rng = self.rng
        # A long unobserved gap is not simulated step by step; cap it so nobody teleports.
        dt = min((t_ms - self.last_ms) / 1000.0, 60.0) if self.last_ms is not None else 0.0
        self.last_ms = t_ms
        if not self.ignition:
            if t_ms >= self.parked_until_ms:
                self.ignition, self.cruise = True, rng.uniform(20.0, 50.0)
            return self._position(t_ms)
        if rng.random() < min(1.0, dt / 40.0):
            # New traffic situation: red light, city street, avenue or motorway.
            self.cruise = rng.choices((0.0, 35.0, 70.0, 105.0), (15, 55, 25, 5))[0]
            self.cruise = max(0.0, self.cruise + rng.uniform(-10.0, 10.0))
        previous = self.speed
        # Roughly 2.5 m/s² of acceleration or braking: ~9 km/h per second.
        if self.cruise > previous:
            self.speed = min(self.cruise, previous + 9.0 * dt)
        else:
            self.speed = max(self.cruise, previous - 9.0 * dt)
        distance = (previous + self.speed) / 2.0 / 3.6 * dt
        if distance > 0:
            self._steer(dt)
            rad = math.radians(self.heading)
            self.lat += distance * math.cos(rad) / _METRES_PER_DEGREE
            self.lon += (
                distance * math.sin(rad) / (_METRES_PER_DEGREE * math.cos(math.radians(self.lat)))
            )
            if self.odometer is not None:
                self.odometer += distance / 1000.0
        elif self.speed < 1.0 and rng.random() < min(1.0, dt / 60.0):
            # Stopped long enough: park with the ignition off for a few minutes.
            self.ignition, self.speed = False, 0.0
            self.parked_until_ms = t_ms + int(rng.uniform(120.0, 1200.0) * 1000)
        return self._position(t_ms)

    def _steer(self, dt: float) -> None:
        rng = self.rng
        north = (self.center[0] - self.lat) * _METRES_PER_DEGREE
        east = (self.center[1] - self.lon) * _METRES_PER_DEGREE * math.cos(math.radians(self.lat))
        if math.hypot(north, east) > _CITY_RADIUS_M:
            # Outside the city: turn back towards the centre so tracks stay plausible.
            home = math.degrees(math.atan2(east, north))
            delta = (home - self.heading + 180.0) % 360.0 - 180.0
            self.heading += max(-45.0, min(45.0, delta))
        elif rng.random() < min(1.0, dt / 120.0):
            self.heading += rng.choice((-90.0, 90.0))
        else:
            self.heading += rng.gauss(0.0, 3.0) * math.sqrt(dt)
        self.heading %= 360.0

    def _position(self, t_ms: int) -> dict[str, Any]:
        position: dict[str, Any] = {
            "Timestamp": _iso_ms(t_ms),
            "Latitude": round(self.lat, 6),
            "Longitude": round(self.lon, 6),
            "Speed": round(self.speed, 1),
            "Direction": round(self.heading, 1) % 360.0,
            "Ignition": self.ignition,
        }
        if self.odometer is not None:
            # Rounding a non-decreasing value keeps it non-decreasing.
            position["Odometer"] = round(self.odometer, 1)
        return position


class FleetSimulator:
    """A deterministic fleet (for a given seed and clock) producing Frotcom PVT batches."""

    def __init__(
        self,
        vehicles: int,
        seed: int = 0,
        odometer_share: float = 0.5,
        first_id: int = 9_000_001,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if vehicles < 0 or not 0.0 <= odometer_share <= 1.0:
            raise ValueError("vehicles must be >= 0 and odometer_share within 0..1")
        self.clock = clock
        self.vins = fleet(vehicles, first_id)
        self.positions_generated = 0
        self.batches_generated = 0
        self._vehicles = [
            self._make_vehicle(vid, seed, index, odometer_share)
            for index, vid in enumerate(self.vins)
        ]

    @staticmethod
    def _make_vehicle(vid: str, seed: int, index: int, share: float) -> _Vehicle:
        # One generator per vehicle: its track does not depend on the size of the fleet.
        rng = random.Random(f"{seed}:{vid}")
        _, lat, lon, style = rng.choice(_CITIES)
        radius, angle = _CITY_RADIUS_M * math.sqrt(rng.random()), rng.uniform(0.0, 2 * math.pi)
        # Spread odometers exactly: vehicle i has one iff floor((i+1)*share) > floor(i*share).
        has_odometer = math.floor((index + 1) * share) > math.floor(index * share)
        return _Vehicle(
            vehicle_id=vid,
            plate=_plate(rng, style),
            rng=rng,
            center=(lat, lon),
            lat=lat + radius * math.cos(angle) / _METRES_PER_DEGREE,
            lon=lon + radius * math.sin(angle) / (_METRES_PER_DEGREE * math.cos(math.radians(lat))),
            heading=rng.uniform(0.0, 360.0),
            odometer=rng.uniform(5_000.0, 250_000.0) if has_odometer else None,
            report_every_s=rng.uniform(*_DRIVING_REPORT_S),
        )

    def next_batch(self, seconds: float = 60.0, per_vehicle: int | None = None) -> dict[str, Any]:
        """One PVT body covering the last ``seconds`` up to clock().

        Each vehicle reports at its own cadence, and at least once per batch so that short
        demo intervals still carry traffic; ``per_vehicle`` asks for exactly that many
        positions each (fewer only if the window has fewer free milliseconds). Vehicles
        with nothing new (the clock did not move) are left out, as Frotcom would.
        """
        now = self.clock()
        now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        end = (now - _EPOCH) // _MS  # floor: never after clock()
        start = end - max(1, round(seconds * 1000)) + 1
        messages = []
        for vehicle in self._vehicles:
            seen = vehicle.seen_until_ms
            first = start if seen is None else max(start, seen + 1)
            if first > end:
                continue
            vehicle.seen_until_ms = end
            if per_vehicle is None:
                positions = self._natural(vehicle, first, end)
            else:
                positions = self._spread(vehicle, first, end, per_vehicle)
            if positions:
                messages.append(
                    {
                        "VehicleID": vehicle.vehicle_id,
                        "LicensePlate": vehicle.plate,
                        "Positions": positions,
                    }
                )
                self.positions_generated += len(positions)
        self.batches_generated += 1
        return {"PvtMessages": messages}

    @staticmethod
    def _natural(vehicle: _Vehicle, first: int, last: int) -> list[dict[str, Any]]:
        rng = vehicle.rng
        due = vehicle.next_ms
        if due is None or due < first:
            # First batch, or the clock jumped ahead: start at a random phase of the cadence.
            due = first + rng.randrange(int(vehicle.report_every_s * 1000))
        positions: list[dict[str, Any]] = []
        while due <= last:
            positions.append(vehicle.advance(due))
            if vehicle.ignition:
                due += max(1, int(vehicle.report_every_s * rng.uniform(0.8, 1.2) * 1000))
            else:
                # Parked: report rarely, but report the ignition coming back on promptly.
                due = max(due + 1, min(due + int(_PARKED_REPORT_S * 1000), vehicle.parked_until_ms))
        vehicle.next_ms = due
        if not positions:
            positions.append(vehicle.advance(rng.randint(first, last)))
        return positions

    @staticmethod
    def _spread(vehicle: _Vehicle, first: int, last: int, count: int) -> list[dict[str, Any]]:
        count = min(count, last - first + 1)
        slot = (last - first + 1) / max(count, 1)
        # Jitter below a third of a slot keeps the instants strictly increasing.
        jitter = int(slot) // 3
        return [
            vehicle.advance(first - 1 + math.floor(slot * (k + 1)) - vehicle.rng.randint(0, jitter))
            for k in range(count)
        ]


@dataclass
class SimulatorStats:
    """What ``simulate`` did: distinct batches and positions generated, and POST outcomes."""

    batches: int = 0
    positions: int = 0
    ok: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    last_error: str | None = None


async def _post(
    session: aiohttp.ClientSession, url: str, token: str, body: bytes
) -> tuple[int, str | None]:
    """POST one batch; return (status, error), status 0 when no HTTP answer came back."""
    headers = {"Authorization": token, "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
            text = (await response.read())[:300].decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    # Frotcom documents only 200 as success; any other answer means "send it again".
    return response.status, None if response.status == 200 else f"HTTP {response.status}: {text}"


async def simulate(
    url: str,
    token: str,
    vehicles: int,
    interval: float,
    *,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    session: aiohttp.ClientSession | None = None,
    seed: int = 0,
    stats: SimulatorStats | None = None,
    batch_seconds: float | None = None,
) -> SimulatorStats:
    """Post one Frotcom batch every ``interval`` seconds until ``duration`` or ``stop``.

    A batch that is not answered 200 is sent again, byte for byte, at the next tick (as
    Frotcom does), and positions that accrue meanwhile go into the following batch. At most
    ``duration / interval + 1`` POSTs are made. ``stats`` may be passed in to watch progress.
    ``batch_seconds`` fixes the window asked of the simulator instead of the elapsed time:
    a first batch then carries that much history, and a shorter window drops older positions.
    """
    if interval <= 0:
        raise ValueError("interval must be > 0")
    stats = stats if stats is not None else SimulatorStats()
    stop = stop if stop is not None else asyncio.Event()
    simulator = FleetSimulator(vehicles, seed=seed)
    own_session = session is None
    client = session if session is not None else aiohttp.ClientSession()
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Ticks are counted as integers so float noise (0.3 / 0.05 = 5.999...) cannot add a POST.
    last_tick = None if duration is None else math.floor(duration / interval + 1e-9)
    pending: tuple[bytes, int] | None = None  # (body, positions) awaiting a 200
    generated_at: float | None = None
    attempt = tick = 0
    try:
        while not stop.is_set():
            now = loop.time()
            if pending is None:
                # Cover everything since the previous batch. The simulator never reports a span
                # twice, so the extra interval only absorbs drift between loop and wall clocks.
                window = interval if generated_at is None else now - generated_at + interval
                window = window if batch_seconds is None else batch_seconds
                batch = simulator.next_batch(window)
                generated_at = now
                count = sum(len(m["Positions"]) for m in batch["PvtMessages"])
                if count:
                    pending, attempt = (json.dumps(batch).encode(), count), 0
                    stats.batches += 1
                    stats.positions += count
            if pending is not None:
                attempt += 1
                status, error = await _post(client, url, token, pending[0])
                stats.statuses[status] += 1
                if error is None:
                    stats.ok += 1
                    log.info("simulator_batch_sent", positions=pending[1], attempt=attempt)
                    pending = None
                else:
                    stats.failed += 1
                    stats.last_error = error
                    # Not logging the token: it is the webhook's only credential.
                    log.warning(
                        "simulator_post_failed",
                        status=status,
                        error=error,
                        positions=pending[1],
                        attempt=attempt,
                    )
            # Keep to the schedule; ticks missed behind a slow POST are skipped, not bunched.
            tick = max(tick + 1, math.ceil((loop.time() - started) / interval))
            next_at = started + tick * interval
            if last_tick is not None and tick > last_tick:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await stop.wait()
    finally:
        if own_session:
            await client.close()
    return stats
