"""The Frotcom webhook through the real app: every row of SPEC §1's response table."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import TOKEN, VIN, batch, position, post_batch, rows
from structlog.testing import capture_logs

from relay import web as web_module
from relay.app import create_app
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack
from relay.outbox import storage
from relay.state import OUTBOX
from relay.web import token_ok

PATH = "/webhooks/frotcom"
ClientFactory = Callable[..., Any]


@pytest.fixture
def start(
    aiohttp_client: ClientFactory, make_config: Callable[..., Config], cartrack: FakeCartrack
) -> Callable[..., Any]:
    """Start the real app with config sections changed (``server={...}``)."""

    async def start_app(
        prepare: Callable[[web.Application], None] | None = None, **sections: Any
    ) -> TestClient:
        app = create_app(make_config(url=cartrack.url, **sections), rescan_seconds=0.2)
        if prepare is not None:
            prepare(app)
        client: TestClient = await aiohttp_client(app)
        return client

    return start_app


def db(client: TestClient) -> Path:
    return client.app[OUTBOX].path


def quarantine(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT vehicle_id, reason, raw FROM quarantine ORDER BY id").fetchall()
    finally:
        conn.close()


def stored_nothing(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return all(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
            for table in ("positions", "quarantine", "vehicle_state")
        )
    finally:
        conn.close()


async def post_raw(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return await client.post(PATH, data=body, headers=headers or {"Authorization": TOKEN})


# -- 200 -----------------------------------------------------------------------------------


async def test_batch_is_stored_and_counted(relay: TestClient, cartrack: FakeCartrack) -> None:
    body = batch(
        (9876543, [position("2023-10-25T16:29:31Z"), position("2023-10-25T16:29:41Z")]),
        ("5555555", [position("2023-10-25T16:29:31Z")]),  # no VIN yet: held
        ("1111111", [position("2023-10-25T16:29:31Z", speed=-3)]),  # quarantined
    )
    status, answer = await post_batch(relay, body)
    assert (status, answer) == (
        200,
        {"status": "success", "accepted": 3, "duplicates": 0, "held": 1, "quarantined": 1},
    )
    # Re-sent by Frotcom after a timeout: the same positions are not stored twice.
    status, answer = await post_batch(relay, body)
    assert (status, answer) == (
        200,
        {"status": "success", "accepted": 0, "duplicates": 3, "held": 0, "quarantined": 1},
    )
    assert len(rows(db(relay))) == 3
    assert len(quarantine(db(relay))) == 1
    # ... and the mapped vehicle's positions reach Cartrack with its VIN.
    await cartrack.wait_for(lambda fake: len(fake.accepted) == 2)
    assert [(e["chassis_number"], e["event_ts"]) for e in cartrack.accepted] == [
        (VIN, "2023-10-25T16:29:31.000Z"),
        (VIN, "2023-10-25T16:29:41.000Z"),
    ]
    assert [r["status"] for r in rows(db(relay), "vehicle_id = '5555555'")] == ["held"]


async def test_rows_are_committed_before_the_response_is_sent(start: Callable[..., Any]) -> None:
    seen: list[tuple[int, int]] = []

    async def look(request: web.Request, response: web.StreamResponse) -> None:
        # Runs as the response headers are about to go out: read the file like an
        # operator's sqlite3 would, through a connection of its own.
        if request.path == PATH and response.status == 200:
            conn = sqlite3.connect(request.app[OUTBOX].path)
            try:
                seen.append(
                    (
                        conn.execute("SELECT count(*) FROM positions").fetchone()[0],
                        conn.execute("SELECT count(*) FROM quarantine").fetchone()[0],
                    )
                )
            finally:
                conn.close()

    client = await start(prepare=lambda app: app.on_response_prepare.append(look))
    body = batch(("9876543", [position(f"2023-10-25T16:29:{s:02d}Z") for s in range(50)] + [{}]))
    status, answer = await post_batch(client, body)
    assert (status, answer["accepted"], answer["quarantined"]) == (200, 50, 1)
    assert seen == [(50, 1)]


async def test_quarantine_rows_carry_raw_json_and_reason(relay: TestClient) -> None:
    bad = position("2023-10-25T16:29:31Z", Ignition="yes", Driver="Zé")
    no_id = {"LicensePlate": "AA-001-AAA", "Positions": [position()]}
    body = {"PvtMessages": [{"VehicleID": "9876543", "Positions": [bad]}, no_id, "junk"]}
    status, answer = await post_batch(relay, body)
    assert (status, answer["quarantined"], answer["accepted"]) == (200, 3, 0)
    got = [(vid, reason, json.loads(raw)) for vid, reason, raw in quarantine(db(relay))]
    assert got == [
        ("9876543", "Ignition: missing or not true/false", bad),
        (None, "PvtMessages[1].VehicleID: missing", no_id),
        (None, "PvtMessages[2]: not an object", "junk"),
    ]


async def test_odd_but_valid_json_is_stored_not_a_500(relay: TestClient) -> None:
    # Lone surrogates and integers beyond a double are valid JSON; a 500 here would make
    # Frotcom resend the batch forever.
    body = (
        '{"PvtMessages": [{"VehicleID": "9876543", "LicensePlate": "\\ud800", "Positions": ['
        '{"Timestamp": "2023-10-25T16:29:31Z", "Latitude": 1, "Longitude": 2, "Speed": 3,'
        ' "Ignition": true, "Note": "\\udfff"},'
        '{"Timestamp": "2023-10-25T16:29:32Z", "Latitude": 1' + "0" * 400 + ', "Longitude": 2,'
        ' "Speed": 3, "Ignition": true}]}]}'
    ).encode()
    response = await post_raw(relay, body)
    assert response.status == 200
    assert await response.json() == {
        "status": "success",
        "accepted": 1,
        "duplicates": 0,
        "held": 0,
        "quarantined": 1,
    }
    assert json.loads(rows(db(relay))[0]["source"])["Note"] == "\udfff"
    ((_, reason, _),) = quarantine(db(relay))
    assert reason.startswith("Latitude: 1000")


def webhook_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "webhook_request"]


async def test_one_canonical_line_per_request(relay: TestClient) -> None:
    body = batch(
        ("9876543", [position("2023-10-25T16:29:31Z"), position("2023-10-25T16:29:31Z")]),
        ("5555555", [position("2023-10-25T16:29:31Z"), {"Timestamp": 1}]),
    )
    raw = json.dumps(body).encode()
    with capture_logs() as logs:
        response = await post_raw(
            relay, raw, headers={"Authorization": TOKEN, "X-Request-ID": "frotcom-42"}
        )
    assert response.status == 200
    assert response.headers["X-Request-ID"] == "frotcom-42"
    # Nothing else is logged for a stored batch: the line says it all.
    (event,) = logs
    duration = event.pop("duration_ms")
    assert isinstance(duration, float)
    assert duration >= 0
    assert event == {
        "event": "webhook_request",
        "log_level": "info",
        "request_id": "frotcom-42",
        "method": "POST",
        "status": 200,
        "positions": 4,
        "accepted": 2,
        "duplicates": 1,
        "held": 1,
        "quarantined": 1,
        "vehicles": 2,
        "bytes": len(raw),
        "remote": "127.0.0.1",
    }


async def test_canonical_line_for_a_wrong_method_and_for_a_bug(
    relay: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    with capture_logs() as logs:
        assert (await relay.get(PATH)).status == 405
        monkeypatch.setattr(web_module, "parse_body", broken)
        assert (await post_batch(relay, batch(("9876543", [position()]))))[0] == 500
    lines = webhook_lines(logs)
    assert [(e["status"], e["log_level"], e["error"]) for e in lines] == [
        (405, "warning", "Method Not Allowed"),
        (500, "error", "unexpected error (see request_failed)"),
    ]
    # The traceback has a line of its own (request_failed), logged at the bug.
    [failed] = [e for e in logs if e["event"] == "request_failed"]
    assert failed["exc_info"] is True


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        ("3f2a9c1e-77b0-4c1e-9d0a-2b6f0e1d5a44", True),
        ("req.42:a_b", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("-leading-dash", False),
        ("has space", False),
        ("tab\tinside", False),
        ("<script>", False),
    ],
)
async def test_request_id_is_kept_only_when_sane(
    relay: TestClient, offered: str, kept: bool
) -> None:
    with capture_logs() as logs:
        response = await post_raw(
            relay,
            json.dumps(batch(("9876543", [position()]))),
            headers={"Authorization": TOKEN, "X-Request-ID": offered},
        )
    assert response.status == 200
    returned = response.headers["X-Request-ID"]
    (line,) = webhook_lines(logs)
    assert line["request_id"] == returned
    if kept:
        assert returned == offered
    else:
        assert returned != offered
        assert re.fullmatch("[0-9a-f]{32}", returned)


async def test_request_ids_are_generated_per_request(relay: TestClient) -> None:
    ids = set()
    for n in range(3):
        response = await relay.post(
            PATH,
            json=batch(("9876543", [position(f"2023-10-25T16:29:3{n}Z")])),
            headers={"Authorization": TOKEN},
        )
        assert response.status == 200
        ids.add(response.headers["X-Request-ID"])
    assert len(ids) == 3
    # Every response carries one, not only the webhook's.
    assert "X-Request-ID" in (await relay.get("/healthz")).headers


# -- 401 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "wrong-token"},
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"{TOKEN}0"},
        {"Authorization": TOKEN[:-1]},
        {"Authorization": TOKEN.lower().replace("-", "_")},
        {"X-Authorization": TOKEN},
    ],
)
async def test_unauthorized(relay: TestClient, headers: dict[str, str]) -> None:
    with capture_logs() as logs:
        response = await relay.post(PATH, json=batch(("9876543", [position()])), headers=headers)
    assert response.status == 401
    assert await response.json() == {
        "error": "unauthorized",
        "detail": "missing or unknown Authorization token",
    }
    assert stored_nothing(db(relay))
    (line,) = logs
    assert line["event"] == "webhook_request"
    assert (line["log_level"], line["status"], line["accepted"]) == ("warning", 401, 0)
    assert line["error"] == "missing or unknown Authorization token"
    assert TOKEN not in repr(logs)


async def test_token_rotation_accepts_every_configured_token(start: Callable[..., Any]) -> None:
    client = await start(frotcom={"tokens": ["old-token-0001", "new-token-0002"]})
    for n, token in enumerate(["old-token-0001", "new-token-0002"]):
        status, answer = await post_batch(
            client, batch(("9876543", [position(f"2023-10-25T16:29:0{n}Z")])), token=token
        )
        assert (status, answer["accepted"]) == (200, 1)
    status, _ = await post_batch(client, batch(("9876543", [position()])), token=TOKEN)
    assert status == 401


async def test_auth_is_checked_before_the_body_is_read(start: Callable[..., Any]) -> None:
    client = await start(server={"max_body_bytes": 2048})
    response = await post_raw(client, b"x" * 10_000, headers={"Authorization": "nope"})
    assert response.status == 401


T1, T2 = b"1234-5678-9097-8466", b"abcd-efgh"


@pytest.mark.parametrize(
    ("header", "tokens", "ok"),
    [
        (None, (T1,), False),
        ("", (T1,), False),
        ("   ", (T1,), False),
        ("1234-5678-9097-8466", (T1,), True),
        ("  1234-5678-9097-8466 ", (T1,), True),
        ("1234-5678-9097-8466", (T2, T1), True),
        ("abcd-efgh", (T1, T2), True),
        ("abcd-efgh", (T1,), False),
        ("Bearer 1234-5678-9097-8466", (T1,), False),
        ("1234-5678-9097-846", (T1,), False),
        ("1234-5678-9097-84666", (T1,), False),
        ("1234-5678-9097-8466", (), False),
        ("", (b"",), False),
        ("\udcff", (T1,), False),
        ("clé", ("clé".encode(),), True),
    ],
)
def test_token_ok(header: str | None, tokens: tuple[bytes, ...], ok: bool) -> None:
    assert token_ok(header, tokens) is ok


# -- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "body is not valid JSON: Expecting value at line 1"),
        (b"PvtMessages", "body is not valid JSON: Expecting value at line 1"),
        (b'{"PvtMessages": [', "body is not valid JSON: Expecting value at line 1"),
        (b'{"PvtMessages": [NaN]}', "body is not valid JSON: NaN is not allowed"),
        (b'{"PvtMessages": [1e999]}', "body is not valid JSON: number 1e999 is out of range"),
        (b"[" * 100_000, "body is not valid JSON: nested too deeply"),
        (b'{"PvtMessages": ["\xe9"]}', "body is not UTF-8 (byte 18)"),
        (b"[]", "body must be a JSON object with a 'PvtMessages' array"),
        (b'{"PvtMessages": {}}', "'PvtMessages' must be an array"),
        (b'{"Messages": []}', "'PvtMessages' must be an array"),
    ],
)
async def test_bad_request(relay: TestClient, body: bytes, detail: str) -> None:
    with capture_logs() as logs:
        response = await post_raw(relay, body)
    assert response.status == 400
    assert response.content_type == "application/json"
    assert await response.json() == {"error": "bad request", "detail": detail}
    assert stored_nothing(db(relay))
    assert [(e["event"], e["log_level"], e["status"], e["error"], e["bytes"]) for e in logs] == [
        ("webhook_request", "warning", 400, detail, len(body))
    ]


# -- 413 -----------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid batch of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    body = json.dumps(batch(("9876543", [position()]))).encode()
    return body + b" " * (size - len(body))


async def test_body_over_the_limit_is_413(start: Callable[..., Any]) -> None:
    client = await start(server={"max_body_bytes": 2048})
    response = await post_raw(client, padded(2048))
    assert response.status == 200
    response = await post_raw(client, padded(2049))
    assert response.status == 413
    assert await response.json() == {
        "error": "payload too large",
        "detail": "body exceeds 2048 bytes",
    }
    assert len(rows(db(client))) == 1


async def test_chunked_body_over_the_limit_is_413(start: Callable[..., Any]) -> None:
    client = await start(server={"max_body_bytes": 2048})

    async def chunks(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 500):
            yield body[i : i + 500]

    # Without Content-Length the limit is enforced while reading.
    response = await post_raw(client, chunks(padded(2048)))
    assert response.status == 200
    response = await post_raw(client, chunks(padded(5000)))
    assert response.status == 413
    assert (await response.json())["error"] == "payload too large"
    assert len(rows(db(client))) == 1


# -- 500 -----------------------------------------------------------------------------------

BIG = batch(
    ("9876543", [position(f"2023-10-25T16:{m:02d}:{s:02d}Z") for m in range(10) for s in range(60)])
)


async def test_disk_full_is_500_then_a_retry_succeeds(relay: TestClient) -> None:
    path = db(relay)
    conn = relay.app[OUTBOX]._conn
    # SQLite's disk-full path, for real: the outbox's connection may not grow the file.
    async with conn.execute("PRAGMA page_count") as cursor:
        (pages,) = await cursor.fetchone()  # type: ignore[misc]
    await conn.execute(f"PRAGMA max_page_count = {pages}")
    with capture_logs() as logs:
        status, answer = await post_batch(relay, BIG)
    assert (status, answer) == (500, {"error": "Internal server error"})
    assert stored_nothing(path)
    (failure,) = logs
    assert failure["event"] == "webhook_request"
    assert (failure["log_level"], failure["status"]) == ("error", 500)
    assert failure["error"] == "outbox store failed: OperationalError: database or disk is full"
    assert (failure["positions"], failure["accepted"], failure["vehicles"]) == (600, 0, 1)

    await conn.execute("PRAGMA max_page_count = 1073741823")  # the operator frees space
    status, answer = await post_batch(relay, BIG)
    assert (status, answer["accepted"]) == (200, 600)
    assert len(rows(path)) == 600


async def test_low_disk_space_guard_is_500_before_writing(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    # Demand more free space than the disk has: the guard must refuse before SQLite runs.
    demand = storage.free_bytes(tmp_path) + 2**40
    client = await start(outbox={"min_free_bytes": demand})
    path = db(client)
    with capture_logs() as logs:
        status, answer = await post_batch(client, BIG)
    assert status == 500
    assert answer == {
        "error": "outbox full",
        "detail": "the relay's disk is nearly full; retry later",
    }
    assert stored_nothing(path)
    (event,) = logs
    assert (event["event"], event["status"], event["log_level"]) == (
        "webhook_request",
        500,
        "error",
    )
    assert event["error"].startswith("outbox low on disk space: ")
    assert event["error"].endswith(f" bytes free, below min_free_bytes={demand}")

    client.app[OUTBOX].min_free_bytes = 0  # space returns: no restart needed
    status, answer = await post_batch(client, BIG)
    assert (status, answer["accepted"]) == (200, 600)
    assert len(rows(path)) == 600


async def test_outbox_locked_too_long_is_500(
    start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_MS", 100)
    client = await start()
    other = sqlite3.connect(db(client), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. an operator's long transaction
        status, answer = await post_batch(client, batch(("9876543", [position()])))
        assert (status, answer) == (500, {"error": "Internal server error"})
        other.execute("ROLLBACK")
        assert stored_nothing(db(client))
        status, answer = await post_batch(client, batch(("9876543", [position()])))
        assert (status, answer["accepted"]) == (200, 1)
    finally:
        other.close()


async def test_unexpected_error_is_json_500(start: Callable[..., Any]) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    client = await start(prepare=lambda app: app.router.add_get("/broken", broken))
    with capture_logs() as logs:
        response = await client.get("/broken")
    assert response.status == 500
    assert await response.json() == {"error": "Internal server error"}
    (failure,) = [e for e in logs if e["event"] == "request_failed"]
    assert (failure["log_level"], failure["path"], failure["method"]) == ("error", "/broken", "GET")
    assert failure["exc_info"] is True


# -- other routes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "message", "detail"),
    [
        ("GET", "/", 404, "Not Found", f"no route for GET /; Frotcom batches go to POST {PATH}"),
        (
            "POST",
            "/webhooks/other",
            404,
            "Not Found",
            f"no route for POST /webhooks/other; Frotcom batches go to POST {PATH}",
        ),
        ("GET", PATH, 405, "Method Not Allowed", f"GET is not allowed on {PATH}; use POST"),
        ("PUT", PATH, 405, "Method Not Allowed", f"PUT is not allowed on {PATH}; use POST"),
    ],
)
async def test_errors_are_json_and_say_where_batches_go(
    relay: TestClient, method: str, path: str, status: int, message: str, detail: str
) -> None:
    response = await relay.request(method, path, headers={"Authorization": TOKEN})
    assert response.status == status
    assert response.content_type == "application/json"
    assert await response.json() == {"error": message, "detail": detail}
    if status == 405:
        assert response.headers["Allow"] == "POST"


async def test_a_long_unknown_path_is_cut_in_the_detail(relay: TestClient) -> None:
    response = await relay.post("/" + "x" * 5000, headers={"Authorization": TOKEN})
    assert response.status == 404
    detail = (await response.json())["detail"]
    assert detail.startswith("no route for POST /" + "x" * 199 + "...;")
    assert len(detail) < 300


async def test_healthz(relay: TestClient) -> None:
    response = await relay.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "forwarder": "running"}
