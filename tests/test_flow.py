"""End to end: a Frotcom batch posted to the real app becomes Cartrack events at the fake.

Events are compared whole against SPEC §2 (mapping and "Precise rules"), so a missing,
extra or misspelt key fails here, and FakeCartrack's strict validation must never answer 422.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import API_KEY, VIN, VIN2, batch, position, post_batch, rows, wait_until

from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.timeutil import format_epoch, parse_timestamp

ISO_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def sent_rows(db: Path, count: int) -> bool:
    found = rows(db)
    return len(found) == count and all(r["status"] == "sent" for r in found)


def event_for(
    vehicle: str,
    vin: str,
    event_ts: str,
    event_type: str,
    received: str,
    lat: float = 41.40338,
    lon: float = 2.17803,
    telemetry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The exact event SPEC §2 prescribes for one position."""
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_ts": event_ts,
        "chassis_number": vin,
        "source": {
            "provider": "frotcom",
            "device_id": vehicle,
            "provider_event_id": f"frotcom:{vehicle}:{event_ts}",
            "provider_received_ts": received,
        },
        "position": {"latitude": lat, "longitude": lon},
    }
    if telemetry is not None:
        event["telemetry"] = telemetry
    return event


async def test_batch_becomes_spec_events_field_by_field(
    relay: TestClient, cartrack: FakeCartrack, db_path: Path
) -> None:
    first = [
        # Listed out of order, with three spellings of UTC; VehicleID as a JSON number.
        position(
            "2023-10-25T16:29:33", ignition=False, speed=12.5, lat=41.5, lon=2.5, Odometer=45231.4
        ),
        position("2023-10-25T16:29:31.087Z", ignition=True),
        position("2023-10-25T16:29:34.000987Z", ignition=True, lat=-33.9, lon=18.4),
        position("2023-10-25T18:29:32.5+02:00", ignition=True),
        position("2023-10-25T16:29:35Z", lat=100.0),  # invalid: quarantined, never sent
    ]
    before = format_epoch(time.time())
    status, body = await post_batch(relay, batch((9876543, first)))
    after = format_epoch(time.time())
    assert status == 200
    assert body == {
        "status": "success",
        "accepted": 4,
        "duplicates": 0,
        "held": 0,
        "quarantined": 1,
    }
    await wait_until(lambda: sent_rows(db_path, 4))

    received = rows(db_path)[0]["received_at"]
    assert ISO_MS_Z.fullmatch(received)
    assert before <= received <= after
    v = "9876543"
    expected = [
        event_for(v, VIN, "2023-10-25T16:29:31.087Z", "PERIODIC", received),  # first ever seen
        event_for(v, VIN, "2023-10-25T16:29:32.500Z", "PERIODIC", received),  # offset -> UTC
        event_for(
            v,
            VIN,
            "2023-10-25T16:29:33.000Z",  # no zone: UTC
            "IGNITION_OFF",
            received,
            lat=41.5,
            lon=2.5,
            telemetry={"speed": 12.5, "ignition": False, "odometer": 45231.4},
        ),
        event_for(v, VIN, "2023-10-25T16:29:34.000Z", "IGNITION_ON", received, -33.9, 18.4),
    ]
    assert cartrack.accepted == expected
    for request in cartrack.requests:
        assert request.headers["X-API-KEY"] == API_KEY
        assert request.headers["Content-Type"] == "application/json"
        assert request.errors == []
    assert dict(cartrack.stats) == {202: 4}

    # A late arrival is PERIODIC and does not change the state: the next position, with
    # ignition on like the newest one before it, is PERIODIC too.
    second = [
        position("2023-10-25T16:29:36.000Z", ignition=True),
        position("2023-10-25T16:29:30.000Z", ignition=False),
    ]
    status, body = await post_batch(relay, batch(("9876543", second)))
    assert (status, body["accepted"]) == (200, 2)
    await wait_until(lambda: sent_rows(db_path, 6))
    received2 = rows(db_path, "event_ts = ?", ("2023-10-25T16:29:36.000Z",))[0]["received_at"]
    assert cartrack.accepted[4:] == [
        event_for(v, VIN, "2023-10-25T16:29:30.000Z", "PERIODIC", received2),
        event_for(v, VIN, "2023-10-25T16:29:36.000Z", "PERIODIC", received2),
    ]
    assert dict(cartrack.stats) == {202: 6}

    for row in rows(db_path):
        assert row["attempts"] == 1
        assert row["last_status"] == 202
        assert row["last_error"] is None
        assert ISO_MS_Z.fullmatch(row["sent_at"])
        assert row["sent_at"] >= row["received_at"]


async def test_resent_batch_keeps_ids_and_sends_nothing_new(
    relay: TestClient, cartrack: FakeCartrack, db_path: Path
) -> None:
    body = batch(
        ("9876543", [position("2023-10-25T16:29:31.087Z"), position("2023-10-25T16:29:32Z")])
    )
    assert (await post_batch(relay, body))[0] == 200
    await wait_until(lambda: sent_rows(db_path, 2))
    ids = cartrack.ids()
    assert ids == [
        "frotcom:9876543:2023-10-25T16:29:31.087Z",
        "frotcom:9876543:2023-10-25T16:29:32.000Z",
    ]

    # The same positions spelt differently are the same instants, hence duplicates.
    again = batch(
        (
            "9876543",
            [position("2023-10-25T18:29:31.087+02:00"), position("2023-10-25T16:29:32.000")],
        )
    )
    for resend in (body, again):
        status, answer = await post_batch(relay, resend)
        assert status == 200
        assert (answer["accepted"], answer["duplicates"]) == (0, 2)

    # Nothing new may go out; another vehicle's event, posted later, marks "later".
    assert (await post_batch(relay, batch(("1111111", [position()]))))[0] == 200
    await cartrack.wait_for(lambda f: len(f.accepted) == 3)
    assert cartrack.ids() == [*ids, "frotcom:1111111:2023-10-25T16:29:31.087Z"]
    assert cartrack.accepted[-1]["chassis_number"] == VIN2
    assert len(cartrack.requests) == 3
    assert cartrack.duplicates == 0
    assert len(rows(db_path)) == 3


async def test_vehicle_events_arrive_in_time_order_across_out_of_order_batches(
    relay: TestClient, cartrack: FakeCartrack, db_path: Path
) -> None:
    # Cartrack is down while both batches arrive: the first event is retried, and the
    # second batch (holding older positions than the first's tail) lands meanwhile.
    gate = {"open": False}
    cartrack.set_default(lambda event: None if gate["open"] else Response(503))
    stamp = "2023-10-25T16:29:{:02d}.000Z".format
    status, _ = await post_batch(
        relay, batch(("9876543", [position(stamp(s)) for s in (50, 10, 30)]))
    )
    assert status == 200
    await cartrack.wait_for(lambda f: len(f.requests) >= 2)
    status, _ = await post_batch(relay, batch(("9876543", [position(stamp(s)) for s in (40, 20)])))
    assert status == 200
    gate["open"] = True
    await wait_until(lambda: sent_rows(db_path, 5))

    assert [e["event_ts"] for e in cartrack.accepted] == [stamp(s) for s in (10, 20, 30, 40, 50)]
    first_tries = {r.event["event_ts"] for r in cartrack.requests if r.status == 503}
    assert first_tries == {stamp(10)}  # nothing overtook the retried head event


async def test_position_slightly_in_the_future_is_sent_once_due(
    relay: TestClient, cartrack: FakeCartrack, db_path: Path
) -> None:
    ahead = format_epoch(time.time() + 1.5)
    status, body = await post_batch(
        relay, batch(("9876543", [position(ahead)]), ("1111111", [position()]))
    )
    assert (status, body["accepted"]) == (200, 2)
    [row] = rows(db_path, "vehicle_id = ?", ("9876543",))
    assert row["next_attempt_at"] == ahead

    await cartrack.wait_for(lambda f: len(f.accepted) == 2, timeout=5)
    # The other vehicle is not kept waiting behind it.
    assert [e["source"]["device_id"] for e in cartrack.accepted] == ["1111111", "9876543"]
    [request] = [r for r in cartrack.requests if r.event["event_ts"] == ahead]
    assert request.time >= parse_timestamp(ahead) / 1000
    assert len(cartrack.requests) == 2
