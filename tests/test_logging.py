"""Log output: JSON lines off a terminal, console on one, and never a secret (SPEC §4)."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import API_KEY, TOKEN, VIN, VIN2, batch, position, rows, wait_until
from proc import RelayProcess

from relay.app import create_app
from relay.config import Config
from relay.devtools.fake_cartrack import FakeCartrack, Response
from relay.logging import MASK, configure_logging, register_secrets, scrub_secrets
from relay.repeats import RepeatLog, RepeatSummariser
from relay.timeutil import format_ms


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_mode_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    log = structlog.get_logger("relay.test")
    log.info("batch_stored", accepted=3, vehicles=["a", "b"])
    log.debug("not_shown")
    log.warning("delivery_failed", detail="multi\nline")

    events = json_lines(stream.getvalue())
    assert [(e["event"], e["level"]) for e in events] == [
        ("batch_stored", "info"),
        ("delivery_failed", "warning"),
    ]
    assert events[0]["accepted"] == 3
    assert events[1]["detail"] == "multi\nline"  # escaped: still one line
    for event in events:
        stamp = event["timestamp"]
        assert stamp.endswith("Z")
        assert datetime.fromisoformat(stamp).utcoffset() is not None


def test_json_mode_renders_exceptions_as_text() -> None:
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    try:
        raise RuntimeError("lane fell over")
    except RuntimeError:
        structlog.get_logger().exception("lane_crashed", vehicle_id="1")
    (event,) = json_lines(stream.getvalue())
    assert event["level"] == "error"
    assert "Traceback" in event["exception"]
    assert "RuntimeError: lane fell over" in event["exception"]


@pytest.mark.parametrize(
    ("stream_type", "json_flag", "expect_json", "expect_colour"),
    [
        (io.StringIO, None, True, False),  # auto, not a terminal: journald wants JSON
        (TtyStream, None, False, True),  # auto, a terminal: readable, coloured
        (io.StringIO, False, False, False),  # --log-format console into a pipe: no escapes
        (TtyStream, True, True, False),  # --log-format json on a terminal
    ],
    ids=["auto-pipe", "auto-tty", "console-pipe", "json-tty"],
)
def test_format_follows_the_stream(
    stream_type: type[io.StringIO], json_flag: bool | None, expect_json: bool, expect_colour: bool
) -> None:
    stream = stream_type()
    configure_logging("info", json=json_flag, stream=stream)
    structlog.get_logger().info("relay_started", vehicles=2)
    text = stream.getvalue()
    assert text.count("\n") == 1
    try:
        json.loads(text)
        is_json = True
    except ValueError:
        is_json = False
    assert is_json is expect_json
    assert ("\x1b[" in text) is expect_colour
    assert "relay_started" in text
    assert "vehicles" in text


def test_stdlib_records_come_out_as_json() -> None:
    """aiohttp and asyncio log through the stdlib; their lines must be JSON too."""
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    server_log = logging.getLogger("aiohttp.server")
    try:
        raise ValueError("handler bug")
    except ValueError:
        server_log.exception("Error handling request from %s", "127.0.0.1")
    logging.getLogger("aiohttp.access").info("GET /healthz 200")  # below WARNING: dropped

    (event,) = json_lines(stream.getvalue())
    assert event["event"] == "Error handling request from 127.0.0.1"
    assert event["level"] == "error"
    assert event["logger"] == "aiohttp.server"
    assert event["timestamp"].endswith("Z")
    assert "ValueError: handler bug" in event["exception"]


def test_configuring_twice_replaces_the_stdlib_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=first)
    configure_logging("info", json=True, stream=second)
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    assert first.getvalue() == ""
    assert len(json_lines(second.getvalue())) == 1


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"event": "x", "detail": f"echo: {API_KEY}"}, {"event": "x", "detail": f"echo: {MASK}"}),
        (
            {"event": "x", "headers": {"X-API-KEY": API_KEY, "Accept": "*/*"}},
            {"event": "x", "headers": {"X-API-KEY": MASK, "Accept": "*/*"}},
        ),
        ({"event": "x", "tokens": [TOKEN, "other"]}, {"event": "x", "tokens": [MASK, "other"]}),
        ({"event": "x", "api_key": "unregistered"}, {"event": "x", "api_key": MASK}),
        ({"event": "x", "Authorization": "Bearer zzz"}, {"event": "x", "Authorization": MASK}),
        ({"event": "x", "token_count": 2}, {"event": "x", "token_count": 2}),
        ({"event": "x", "api_key_required": True}, {"event": "x", "api_key_required": True}),
        ({"event": "x", "detail": "short abc"}, {"event": "x", "detail": "short abc"}),
        ({"event": f"leaked {TOKEN}"}, {"event": f"leaked {MASK}"}),
    ],
    ids=[
        "value-in-text",
        "nested-dict",
        "in-list",
        "secret-named-key",
        "authorization-key",
        "count-is-not-secret",
        "flag-is-not-secret",
        "short-secret-ignored",
        "in-event-name",
    ],
)
def test_scrub_secrets(event: dict[str, Any], expected: dict[str, Any]) -> None:
    register_secrets([API_KEY, TOKEN, "abc"])
    assert scrub_secrets(None, "info", event) == expected


@pytest.mark.parametrize("json_flag", [True, False], ids=["json", "console"])
def test_registered_secrets_never_reach_the_stream(json_flag: bool) -> None:
    stream = io.StringIO()
    configure_logging("info", json=json_flag, stream=stream)
    register_secrets([API_KEY, TOKEN])
    structlog.get_logger().error("cartrack_redirect", location=f"https://x/?key={API_KEY}")
    logging.getLogger("aiohttp.client").warning("header Authorization: %s", TOKEN)
    text = stream.getvalue()
    assert API_KEY not in text
    assert TOKEN not in text
    assert text.count(MASK) == 2


# -- a whole run of the real daemon ------------------------------------------------------


@pytest.mark.slow
async def test_a_whole_daemon_run_logs_json_and_no_secret(
    tmp_path: Path, cartrack: FakeCartrack
) -> None:
    """Every path that handles a secret runs once; the log is JSON and mentions none."""
    assert cartrack.url is not None
    # Cartrack refuses the key (pause, then a probe), then rejects an event with a body
    # that echoes the key back, then accepts the rest.
    cartrack.script(401, Response(400, {"error": "bad event", "echo": {"X-API-KEY": API_KEY}}))
    async with RelayProcess(tmp_path, cartrack.url) as relay:
        await relay.start()
        status, _ = await relay.post(
            batch(("9876543", [position(ts=f"2023-10-25T16:29:3{i}.000Z") for i in range(3)]))
        )
        assert status == 200
        assert (await relay.post(batch(), token="wrong-" + TOKEN))[0] == 401
        assert (await relay.post({"PvtMessages": "nope"}))[0] == 400
        await wait_until(
            lambda: sorted(r["status"] for r in rows(relay.db_path)) == ["failed", "sent", "sent"]
        )
        relay.send_signal(signal.SIGHUP)
        await relay.wait_event("vehicles_reloaded")
        assert await relay.stop() == 0

        events = relay.events()  # parses every line: a non-JSON line fails here
        assert all({"event", "level", "timestamp"} <= e.keys() for e in events)
        names = {e["event"] for e in events}
        assert {"forwarder_paused", "event_rejected", "webhook_request"} <= names
        statuses = sorted(e["status"] for e in events if e["event"] == "webhook_request")
        assert statuses == [200, 400, 401]
        output = relay.all_output()
        assert API_KEY not in output
        assert TOKEN not in output
        stored = " ".join(str(r["last_error"]) for r in rows(relay.db_path))
        assert API_KEY not in stored


# -- request ids -------------------------------------------------------------------------


async def test_request_id_reaches_every_line_of_the_request_and_no_other(
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
) -> None:
    """Rendered for real (merge_contextvars in the chain): the id is on the request's
    lines, including a library's, and not on the forwarder's, which outlive it."""

    async def broken(request: web.Request) -> web.Response:
        logging.getLogger("aiohttp.server").error("library trouble")
        raise RuntimeError("a bug")

    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    cartrack.script(Response(503))
    app = create_app(make_config(url=cartrack.url), rescan_seconds=0.2)
    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    response = await client.post(
        "/webhooks/frotcom",
        json=batch(("9876543", [position()])),
        headers={"Authorization": TOKEN, "X-Request-ID": "batch-7"},
    )
    assert response.status == 200
    failing = await client.get("/broken", headers={"X-Request-ID": "probe-9"})
    assert failing.status == 500
    assert failing.headers["X-Request-ID"] == "probe-9"
    await cartrack.wait_for(lambda f: len(f.accepted) == 1)
    await client.close()

    events = json_lines(stream.getvalue())
    by_id: dict[str | None, list[str]] = {}
    for event in events:
        by_id.setdefault(event.get("request_id"), []).append(event["event"])
    assert by_id["batch-7"] == ["webhook_request"]
    assert by_id["probe-9"] == ["library trouble", "request_failed"]
    # The delivery that the batch caused is not part of the request.
    assert "delivery_failed" in by_id[None]


# -- summarising repeats -----------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (time offset, key) -> logged in full?; then the summaries due at the end.
        pytest.param([(0, "a")], ([True], []), id="first-is-logged"),
        pytest.param(
            [(0, "a"), (1, "a"), (2, "a")],
            ([True, False, False], [("a", 2, 1, 2)]),
            id="repeats-summarised",
        ),
        pytest.param([(0, "a"), (1, "b")], ([True, True], []), id="different-kinds"),
        pytest.param(
            [(0, "a"), (59, "a"), (60, "a")],
            ([True, False, True], [("a", 1, 59, 59)]),
            id="new-window-logs-again",
        ),
        pytest.param(
            [(0, "a"), (61, "a"), (62, "a")],
            ([True, True, False], [("a", 1, 62, 62)]),
            id="quiet-window-no-summary",
        ),
    ],
)
def test_repeat_summariser(
    steps: list[tuple[float, str]],
    expected: tuple[list[bool], list[tuple[str, int, float, float]]],
) -> None:
    clock = FakeClock()
    start = clock.now
    summariser = RepeatSummariser(window=60, clock=clock)
    admitted, summaries = [], []
    for offset, key in steps:
        clock.now = start + offset
        admitted.append(summariser.admit(key, {"at": offset}))
        summaries += summariser.due()
    clock.now += 3600  # every window has ended
    summaries += summariser.due()
    want_admitted, want_summaries = expected
    assert admitted == want_admitted
    assert [(s.key, s.count, s.first - start, s.last - start) for s in summaries] == want_summaries
    assert all(s.example == {"at": s.first - start} for s in summaries)


def test_repeat_summariser_force_flushes_open_windows() -> None:
    clock = FakeClock()
    summariser = RepeatSummariser(window=60, clock=clock)
    assert summariser.admit("a", {})
    assert not summariser.admit("a", {})
    assert summariser.due() == []  # the window is still open
    [summary] = summariser.due(force=True)
    assert summary.count == 1
    assert summariser.due(force=True) == []


def test_repeat_summariser_stays_bounded() -> None:
    summariser = RepeatSummariser(window=60, clock=FakeClock(), max_kinds=2)
    assert [summariser.admit(k, {}) for k in "abcc"] == [True, True, True, True]
    # Past the bound a kind is logged every time rather than tracked.
    assert not summariser.admit("a", {})


def test_repeat_log_writes_the_first_line_then_one_summary() -> None:
    clock = FakeClock()
    repeats = RepeatLog(
        structlog.get_logger(), "delivery_failures_summary", RepeatSummariser(60, clock)
    )
    with structlog.testing.capture_logs() as logs:
        for row in range(5):
            clock.now += 1
            repeats.log("warning", "delivery_failed", ("status",), row_id=row, status=500)
        repeats.log("warning", "delivery_failed", ("status",), row_id=9, status=503)
        clock.now += 60
        repeats.flush()
    assert [(e["event"], e.get("row_id")) for e in logs] == [
        ("delivery_failed", 0),
        ("delivery_failed", 9),
        ("delivery_failures_summary", None),
    ]
    summary = logs[-1]
    assert summary == {
        "event": "delivery_failures_summary",
        "log_level": "warning",
        "summarised": "delivery_failed",
        "status": 500,
        "count": 4,
        "first": format_ms((1_700_000_000 + 2) * 1000),
        "last": format_ms((1_700_000_000 + 5) * 1000),
        "window_seconds": 60,
        "example": {"row_id": 1},
    }


async def test_an_outage_logs_one_failure_line_and_a_summary(
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    cartrack: FakeCartrack,
    logs: list[dict[str, Any]],
) -> None:
    """Cartrack answers every event alike: one delivery_failed line, then the count."""
    cartrack.set_default(lambda event: Response(500, body={"error": "maintenance"}))
    config = make_config(url=cartrack.url)
    client = await aiohttp_client(create_app(config, rescan_seconds=0.2))
    vehicles = {"9876543": VIN, "1111111": VIN2}
    for vid in vehicles:
        assert (
            await client.post(
                "/webhooks/frotcom",
                json=batch((vid, [position()])),
                headers={"Authorization": TOKEN},
            )
        ).status == 200
    await cartrack.wait_for(lambda f: len(f.requests) >= 10)
    await client.close()

    failures = [e for e in logs if e["event"] == "delivery_failed"]
    [summary] = [e for e in logs if e["event"] == "delivery_failures_summary"]
    assert len(failures) == 1
    assert (failures[0]["status"], failures[0]["reason"]) == (500, "500")
    assert failures[0]["detail"] == '{"error": "maintenance"}'
    assert failures[0]["next_attempt_at"] is not None
    # Every failed attempt is either the line or counted in the summary.
    attempts = sum(r["attempts"] for r in rows(config.outbox.path))
    assert summary["count"] == attempts - 1
    assert (summary["summarised"], summary["status"], summary["reason"]) == (
        "delivery_failed",
        500,
        "500",
    )
    assert summary["example"]["vehicle_id"] in vehicles
