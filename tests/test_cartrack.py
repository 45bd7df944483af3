"""Tests for relay.cartrack: status table, retry maths, and the client against a real server."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from relay.cartrack import (
    DETAIL_LIMIT,
    RETRY_AFTER_CAP,
    CartrackClient,
    Outcome,
    Verdict,
    backoff_delay,
    classify,
    parse_retry_after,
    retry_delay,
)

API_KEY = "sk-test-3f9c2a71-secret-key"
INGEST = "/api/data/ingest/telematics"
EVENT = json.dumps(
    {"event_type": "PERIODIC", "source": {"provider_event_id": "frotcom:1:2026-01-19T08:42:15Z"}}
).encode()
NOW = datetime(2026, 1, 19, 8, 0, 0, tzinfo=UTC).timestamp()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- classify -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299, 409])
def test_classify_sent(status: int) -> None:
    assert classify(status) is Verdict.SENT


@pytest.mark.parametrize("status", [401, 403])
def test_classify_auth(status: int) -> None:
    assert classify(status) is Verdict.AUTH


@pytest.mark.parametrize(
    "status",
    [
        *(408, 425, 429, 500, 502, 503, 504, 599),
        # never followed, so a redirect is an infrastructure problem, not a bad event
        *(300, 301, 302, 303, 304, 307, 308),
        # outside the defined classes: retrying is the only choice that loses nothing
        *(0, 100, 101, 199, 600, 999),
    ],
)
def test_classify_transient(status: int) -> None:
    assert classify(status) is Verdict.TRANSIENT


@pytest.mark.parametrize("status", [400, 402, 404, 405, 406, 410, 411, 413, 415, 422, 451, 499])
def test_classify_rejected(status: int) -> None:
    assert classify(status) is Verdict.REJECTED


def test_verdict_values_are_stable_words() -> None:
    # Other modules store and compare these strings.
    assert [v.value for v in Verdict] == ["sent", "transient", "rejected", "auth"]


# --- parse_retry_after ----------------------------------------------------------------------


def _http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("3600", 3600.0),
        ("3601", RETRY_AFTER_CAP),
        ("86400", RETRY_AFTER_CAP),
        ("9" * 400, RETRY_AFTER_CAP),
        (_http_date(90), 90.0),
        (_http_date(-90), 0.0),
        (_http_date(10 * 86400), RETRY_AFTER_CAP),
        ("Mon, 19 Jan 2026 08:02:00 -0000", 120.0),
        ("Mon, 19 Jan 2026 09:02:00 +0100", 120.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after_valid(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "-5", "-0.5", "soon", "12s", "1e3", "inf", "nan", "0x10", "1,5", "Wed, 99"],
)
def test_parse_retry_after_unusable(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises_and_stays_in_bounds(value: str) -> None:
    result = parse_retry_after(value, NOW)
    assert result is None or 0.0 <= result <= RETRY_AFTER_CAP


# --- backoff_delay / retry_delay ------------------------------------------------------------


def test_backoff_ceiling_doubles_then_caps() -> None:
    delays = [backoff_delay(n, 1.0, 300.0, rand=lambda: 1.0) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_backoff_zero_jitter_gives_zero() -> None:
    assert backoff_delay(5, 1.0, 300.0, rand=lambda: 0.0) == 0.0


def test_backoff_jitter_scales_ceiling() -> None:
    assert backoff_delay(3, 1.0, 300.0, rand=lambda: 0.5) == 2.0


@pytest.mark.parametrize("attempt", [1_000, 10_000, 10**18])
def test_backoff_huge_attempt_does_not_overflow(attempt: int) -> None:
    assert backoff_delay(attempt, 1.0, 300.0, rand=lambda: 1.0) == 300.0


@pytest.mark.parametrize("attempt", [0, -3])
def test_backoff_nonpositive_attempt_is_first_retry(attempt: int) -> None:
    assert backoff_delay(attempt, 2.0, 300.0, rand=lambda: 1.0) == 2.0


@given(
    attempt=st.integers(min_value=-10, max_value=10**6),
    initial=st.floats(min_value=0.0, max_value=1e6),
    maximum=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_within_bounds(attempt: int, initial: float, maximum: float, jitter: float) -> None:
    delay = backoff_delay(attempt, initial, maximum, rand=lambda: jitter)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= maximum


def test_retry_delay_without_retry_after_is_backoff() -> None:
    assert retry_delay(4, 1.0, 300.0, None, rand=lambda: 1.0) == 8.0


def test_retry_delay_backoff_wins_when_longer() -> None:
    assert retry_delay(4, 1.0, 300.0, 3.0, rand=lambda: 1.0) == 8.0


def test_retry_after_is_a_minimum_even_with_zero_jitter() -> None:
    assert retry_delay(1, 1.0, 300.0, 7.0, rand=lambda: 0.0) == 7.0


def test_retry_after_beyond_max_seconds_wins() -> None:
    assert retry_delay(20, 1.0, 300.0, 1200.0, rand=lambda: 1.0) == 1200.0


def test_retry_after_beyond_an_hour_is_capped() -> None:
    assert retry_delay(1, 1.0, 300.0, 86400.0, rand=lambda: 1.0) == RETRY_AFTER_CAP


def test_retry_after_negative_is_ignored() -> None:
    assert retry_delay(2, 1.0, 300.0, -50.0, rand=lambda: 1.0) == 2.0


# --- CartrackClient against a real local server ---------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]  # the client's end of the connection it came on


@dataclass
class FakeCartrack:
    """A local HTTP server that records every request and answers via `handler`."""

    server: TestServer
    received: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    clients: list[CartrackClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url(INGEST))

    def client(self, timeout: float = 5.0, concurrency: int = 4) -> CartrackClient:
        client = CartrackClient(
            self.url, API_KEY, timeout, concurrency=concurrency, clock=lambda: NOW
        )
        self.clients.append(client)
        return client

    @property
    def connections(self) -> int:
        return len({r.peer for r in self.received})


@pytest.fixture
async def cartrack(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[FakeCartrack]:
    fake: FakeCartrack

    async def dispatch(request: web.Request) -> web.StreamResponse:
        # Record before reading further so requests the handler aborts still count.
        body = await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        fake.received.append(Received(request.path, dict(request.headers), body, peer))
        if request.path != INGEST or fake.handler is None:
            return web.Response(status=200, text="not the ingest endpoint")
        return await fake.handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    fake = FakeCartrack(server=await aiohttp_server(app))
    yield fake
    for client in fake.clients:
        await client.close()


def respond(status: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    return handler


def assert_no_secret(outcome: Outcome, logs: list[dict[str, object]]) -> None:
    assert API_KEY not in outcome.detail
    assert API_KEY not in repr(logs)


async def test_request_carries_key_content_type_and_exact_body(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(202, '{"status":"accepted"}')
    with structlog.testing.capture_logs() as logs:
        outcome = await cartrack.client().send(EVENT)

    assert outcome.verdict is Verdict.SENT
    assert outcome.status == 202
    assert outcome.detail == ""  # nothing of an accepted answer is kept
    assert outcome.retry_after is None
    assert outcome.elapsed >= 0.0
    [req] = cartrack.received
    assert req.path == INGEST
    assert req.headers["X-API-KEY"] == API_KEY
    assert req.headers["Content-Type"] == "application/json"
    assert req.body == EVENT
    assert_no_secret(outcome, logs)


async def test_duplicate_409_is_sent(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(409, '{"error":"duplicate provider_event_id"}')
    outcome = await cartrack.client().send(EVENT)
    assert (outcome.verdict, outcome.status) == (Verdict.SENT, 409)


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure(cartrack: FakeCartrack, status: int) -> None:
    cartrack.handler = respond(status, "invalid api key")
    outcome = await cartrack.client().send(EVENT)
    assert (outcome.verdict, outcome.status) == (Verdict.AUTH, status)


async def test_validation_error_is_rejected_with_detail(cartrack: FakeCartrack) -> None:
    problem = {"errors": [{"field": "chassis_number", "message": "unknown vehicle"}]}
    cartrack.handler = respond(422, json.dumps(problem))
    outcome = await cartrack.client().send(EVENT)
    assert (outcome.verdict, outcome.status) == (Verdict.REJECTED, 422)
    assert json.loads(outcome.detail) == problem


async def test_long_body_is_truncated(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(400, "x" * 100_000)
    outcome = await cartrack.client().send(EVENT)
    assert outcome.verdict is Verdict.REJECTED
    assert outcome.detail == "x" * DETAIL_LIMIT


@pytest.mark.parametrize("status", [200, 409])
async def test_long_answer_to_an_accepted_event_is_not_kept_and_the_next_request_works(
    cartrack: FakeCartrack, status: int
) -> None:
    # Beyond the bounded read the connection is dropped rather than read to its end.
    cartrack.handler = respond(status, "x" * 100_000)
    client = cartrack.client()
    for _ in range(2):
        outcome = await client.send(EVENT)
        assert (outcome.verdict, outcome.status, outcome.detail) == (Verdict.SENT, status, "")
    assert len(cartrack.received) == 2


async def body_after_the_headers(request: web.Request) -> web.StreamResponse:
    # The status line and headers go out first, the body a moment later: the client
    # has its status before the body is in, and must read the body to reuse the socket.
    response = web.StreamResponse(status=200, headers={"Content-Length": "2"})
    await response.prepare(request)
    await asyncio.sleep(0.01)
    await response.write(b"{}")
    await response.write_eof()
    return response


@pytest.mark.parametrize(
    "handler",
    [respond(200, "{}"), respond(409, ""), body_after_the_headers],
    ids=["body-with-headers", "no-body", "body-after-headers"],
)
async def test_accepted_events_go_out_on_one_reused_connection(
    cartrack: FakeCartrack, handler: Handler
) -> None:
    # The accepted path keeps nothing of the answer; its connection must still go back
    # to the pool, also when the body comes after the headers.
    cartrack.handler = handler
    client = cartrack.client(concurrency=1)
    for _ in range(5):
        assert (await client.send(EVENT)).verdict is Verdict.SENT
    assert len(cartrack.received) == 5
    assert cartrack.connections == 1


async def test_multibyte_body_is_truncated_in_characters(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(400, "\N{GRINNING FACE}" * 5000)
    outcome = await cartrack.client().send(EVENT)
    assert outcome.detail == "\N{GRINNING FACE}" * DETAIL_LIMIT


async def test_undecodable_body_is_replaced_not_raised(cartrack: FakeCartrack) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=b"bad \xff\xfe bytes")

    cartrack.handler = handler
    outcome = await cartrack.client().send(EVENT)
    assert outcome.detail == "bad \ufffd\ufffd bytes"


async def test_echoed_api_key_is_redacted_from_detail(cartrack: FakeCartrack) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, text=f"bad request, key={request.headers['X-API-KEY']}")

    cartrack.handler = echo
    outcome = await cartrack.client().send(EVENT)
    assert outcome.verdict is Verdict.REJECTED
    assert API_KEY not in outcome.detail
    assert outcome.detail.startswith("bad request, key=")


async def test_429_with_retry_after_seconds(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(429, "slow down", {"Retry-After": "7"})
    outcome = await cartrack.client().send(EVENT)
    assert (outcome.verdict, outcome.status, outcome.retry_after) == (Verdict.TRANSIENT, 429, 7.0)


async def test_503_with_retry_after_date_uses_injected_clock(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(503, "", {"Retry-After": _http_date(45)})
    outcome = await cartrack.client().send(EVENT)
    assert outcome.verdict is Verdict.TRANSIENT
    assert outcome.retry_after == pytest.approx(45.0)


async def test_garbage_retry_after_is_none(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(503, "", {"Retry-After": "whenever"})
    outcome = await cartrack.client().send(EVENT)
    assert outcome.retry_after is None


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_is_transient_logged_and_not_followed(
    cartrack: FakeCartrack, status: int
) -> None:
    target = str(cartrack.server.make_url("/moved/here"))
    cartrack.handler = respond(status, "moved", {"Location": target})
    with structlog.testing.capture_logs() as logs:
        outcome = await cartrack.client().send(EVENT)

    assert (outcome.verdict, outcome.status) == (Verdict.TRANSIENT, status)
    assert [r.path for r in cartrack.received] == [INGEST]
    redirects = [e for e in logs if e["event"] == "cartrack_redirect"]
    assert len(redirects) == 1
    assert redirects[0]["log_level"] == "error"
    assert redirects[0]["status"] == status
    assert redirects[0]["location"] == target
    assert_no_secret(outcome, logs)


async def test_redirect_location_carrying_the_key_is_redacted(cartrack: FakeCartrack) -> None:
    cartrack.handler = respond(302, "", {"Location": f"https://elsewhere.example/?key={API_KEY}"})
    with structlog.testing.capture_logs() as logs:
        outcome = await cartrack.client().send(EVENT)
    assert outcome.verdict is Verdict.TRANSIENT
    assert any(e["event"] == "cartrack_redirect" for e in logs)
    assert_no_secret(outcome, logs)


async def test_timeout_is_transient_without_status(cartrack: FakeCartrack) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    cartrack.handler = stall
    try:
        with structlog.testing.capture_logs() as logs:
            outcome = await cartrack.client(timeout=0.2).send(EVENT)
    finally:
        release.set()

    assert outcome.verdict is Verdict.TRANSIENT
    assert outcome.status is None
    assert outcome.retry_after is None
    assert "timeout" in outcome.detail
    assert "0.2s" in outcome.detail
    assert 0.15 <= outcome.elapsed < 5.0
    assert_no_secret(outcome, logs)


async def test_cancellation_propagates(cartrack: FakeCartrack) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.Response(status=200)

    cartrack.handler = stall
    task = asyncio.create_task(cartrack.client().send(EVENT))
    try:
        await asyncio.wait_for(arrived.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()


async def test_connection_refused_is_transient() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = CartrackClient(f"http://127.0.0.1:{port}{INGEST}", API_KEY, 2.0)
    with structlog.testing.capture_logs() as logs:
        outcome = await client.send(EVENT)
    await client.close()

    assert outcome.verdict is Verdict.TRANSIENT
    assert outcome.status is None
    assert outcome.retry_after is None
    assert outcome.detail.startswith("connection error: ")
    assert_no_secret(outcome, logs)


async def test_connection_dropped_mid_request_is_transient(cartrack: FakeCartrack) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=200)

    cartrack.handler = drop
    with structlog.testing.capture_logs() as logs:
        outcome = await cartrack.client().send(EVENT)

    assert len(cartrack.received) == 1
    assert outcome.verdict is Verdict.TRANSIENT
    assert outcome.status is None
    assert outcome.detail.startswith("connection error: ")
    assert_no_secret(outcome, logs)


async def test_body_cut_short_keeps_the_status_verdict(cartrack: FakeCartrack) -> None:
    # Headers promise more body than arrives: Cartrack did answer 200, so the event
    # must count as sent rather than be re-sent because the response body broke off.
    async def short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"status":')
        assert request.transport is not None
        request.transport.close()
        return response

    cartrack.handler = short
    client = cartrack.client()
    outcome = await client.send(EVENT)
    assert (outcome.verdict, outcome.status) == (Verdict.SENT, 200)
    # The broken connection is not reused: the next event goes out on a new one.
    cartrack.handler = respond(202)
    assert (await client.send(EVENT)).verdict is Verdict.SENT
