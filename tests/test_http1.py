"""Tests for relay.http1: the wire, framing, bounds, errors, deadlines, the pool and TLS.

Most servers here are raw asyncio ones scripted byte by byte (tests/scripted_http.py),
so the framing under test is exactly what goes over the wire; each counts the
connections it accepts and closes. The Cartrack verdicts built on this client are
tested in test_cartrack.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop
from conftest import wait_until
from scripted_http import CHUNKED, CLOSE_OK, OK, Close, Net, Peer, Stall

from relay.http1 import Http1Client, ProtocolError, Response, ServerDisconnected


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    net = Net()
    yield net
    await net.aclose()


Tls = tuple[ssl.SSLContext, ssl.SSLContext]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A server context with a self-signed certificate for IP 127.0.0.1, a client's trusting it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


# -- the request, reuse, framing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "target", "body"),
    [("/api/ingest?a=1&b=two", b"/api/ingest?a=1&b=two", b'{"a":1}'), ("", b"/", b"")],
)
async def test_request_bytes_and_answer(net: Net, tail: str, target: bytes, body: bytes) -> None:
    server = await net.serve(b"HTTP/1.1 201 Created\r\nX-Id: 7\r\nContent-Length: 5\r\n\r\nhello")
    headers = {"Content-Type": "application/json", "X-API-KEY": "k3y"}
    client = net.client(f"http://127.0.0.1:{server.port}{tail}", headers=headers, user_agent="t/1")
    response = await client.post(body, 5.0)
    assert response == Response(201, [("x-id", "7"), ("content-length", "5")], b"hello", "")
    assert (response.header("x-id"), response.header("X-Id")) == ("7", None)
    assert server.requests == [
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: t/1\r\n" % (target, server.port)
        + b"Content-Type: application/json\r\nX-API-KEY: k3y\r\n"
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    ]


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (OK, True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (CLOSE_OK, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ],
    ids=["1.1", "1.0-keep-alive", "1.1-close", "1.0"],
)
async def test_connection_reuse_follows_the_answer(net: Net, answer: bytes, reused: bool) -> None:
    server = await net.serve(answer)  # never closes first: the client decides
    client = net.client(server)
    for _ in range(5):
        response = await client.post(b"{}", 5.0)
        assert (response.status, response.body, response.cut) == (200, b"ok", "")
    assert len(server.requests) == 5
    assert server.accepted == (1 if reused else 5)
    await wait_until(lambda: server.closed == (0 if reused else 5))
    assert client.open_connections == (1 if reused else 0)


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", 201, b"hello"),
        (CHUNKED + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 200, b"hello world"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 304, b""),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"ok"),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK, 200, b"ok"),
        (Close(b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 1000), 200, b"a" * 1000),
    ],
    ids=["length", "chunked", "204", "304", "100", "103", "until-close"],
)
async def test_framing(net: Net, answer: bytes, status: int, body: bytes, dribble: bool) -> None:
    server = await net.serve(answer, dribble=dribble)
    client = net.client(server)
    for _ in range(2):
        response = await client.post(b"{}", 5.0)
        assert (response.status, response.body, response.cut) == (status, body, "")
        assert response.header("link") is None  # an interim answer's headers are not kept
    # A body that ends with the connection leaves none to reuse; the rest share one.
    assert server.accepted == (2 if isinstance(answer, Close) else 1)


# -- bounds and broken answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "reused"), [(1000, True), (64 * 1024, True), (64 * 1024 + 1, False), (200_000, False)]
)
async def test_long_body_is_cut_at_the_limit(net: Net, size: int, reused: bool) -> None:
    long = b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\n\r\n%s" % (size, b"x" * size)
    server = await net.serve(long, OK)
    client = net.client(server, body_limit=10)
    assert await client.post(b"{}", 5.0) == Response(
        400, [("content-length", str(size))], b"x" * 10
    )
    assert (await client.post(b"{}", 5.0)).body == b"ok"
    assert server.accepted == (1 if reused else 2)
    assert client.open_connections == 1


@pytest.mark.parametrize(
    "broken",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"status":',
        CHUNKED + b'a\r\n{"status":\r\n',
    ],
    ids=["length", "chunked"],
)
async def test_body_breaking_off_keeps_the_status(net: Net, broken: bytes) -> None:
    server = await net.serve(Close(broken), OK)
    client = net.client(server)
    response = await client.post(b"{}", 5.0)
    assert (response.status, response.body) == (200, b'{"status":')
    assert response.cut == " [body read failed: connection closed]"
    assert (await client.post(b"{}", 5.0)).body == b"ok"
    assert server.accepted == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Close(b""), ServerDisconnected),
        (Close(b"HTTP/1.1 200 OK\r\nContent-Le"), ServerDisconnected),
        (b"SSH-2.0-OpenSSH_9.6\r\n", ProtocolError),
        (b"HTTP/1.1 2OO OK\r\n\r\n", ProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", ProtocolError),
        (CHUNKED + b"zz\r\n", ProtocolError),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            ProtocolError,
        ),
    ],
    ids=["closed", "half-headers", "ssh", "status", "two-lengths", "chunk-size", "upgrade"],
)
async def test_no_usable_answer(net: Net, answer: bytes, error: type[ConnectionError]) -> None:
    server = await net.serve(answer)
    client = net.client(server)
    with pytest.raises(error):
        await client.post(b"{}", 5.0)
    await wait_until(lambda: server.closed == 1)  # the server kept garbage's connection open
    assert client.open_connections == 0


async def test_connection_refused(net: Net) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = net.client(f"http://127.0.0.1:{port}/", limit=1)
    for _ in range(2):  # a slot leaked by the first would make the second wait, not fail
        with pytest.raises(ConnectionRefusedError):
            await client.post(b"{}", 5.0)
    assert client.open_connections == 0


# -- deadlines and the pool --------------------------------------------------------------------


@pytest.mark.parametrize(
    "stall", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe"], ids=["silent", "half-body"]
)
async def test_no_answer_times_out(net: Net, stall: bytes) -> None:
    server = await net.serve(Stall(stall))
    client = net.client(server)
    with pytest.raises(TimeoutError):
        await client.post(b"{}", 0.1)
    assert client.open_connections == 0
    await wait_until(lambda: server.closed == 1)


async def test_pool_opens_at_most_limit_connections(net: Net) -> None:
    gate = asyncio.Event()
    server = await net.serve(OK, gate=gate)
    client = net.client(server, limit=2)
    posts = [asyncio.create_task(client.post(b"%d" % i, 5.0)) for i in range(5)]
    await wait_until(lambda: len(server.requests) == 2)
    gate.set()
    assert [(await p).body for p in posts] == [b"ok"] * 5
    assert (server.most_open, server.accepted, len(server.requests)) == (2, 2, 5)
    assert client.open_connections == 2


async def test_waiters_timed_out_or_cancelled_leak_no_slot(net: Net) -> None:
    gate = asyncio.Event()
    server = await net.serve(OK, gate=gate)
    client = net.client(server, limit=1)
    busy = asyncio.create_task(client.post(b"0", 5.0))
    await wait_until(lambda: len(server.requests) == 1)
    with pytest.raises(TimeoutError):  # the deadline covers the wait for the one slot
        await client.post(b"1", 0.05)
    waiting = [asyncio.create_task(client.post(b"%d" % i, 5.0)) for i in (2, 3, 4)]
    await asyncio.sleep(0)  # all three now wait for the slot
    for task in waiting[:2]:
        task.cancel()
    gate.set()
    assert (await busy).status == (await waiting[2]).status == 200
    assert all(task.cancelled() for task in waiting[:2])
    assert (await client.post(b"5", 5.0)).status == 200
    assert [r[-1:] for r in server.requests] == [b"0", b"4", b"5"]
    assert (server.accepted, client.open_connections) == (1, 1)


@pytest.mark.parametrize("first", [OK, CLOSE_OK], ids=["handed-connection", "handed-slot"])
async def test_waiter_cancelled_as_it_is_handed_a_connection(net: Net, first: bytes) -> None:
    gate = asyncio.Event()
    server = await net.serve(first, OK, gate=gate)
    client = net.client(server, limit=1)

    async def post_then_cancel_the_next() -> Response:
        response = await client.post(b"1", 5.0)
        # The connection (or its slot) went to `victim` just now; it has not run yet.
        victim.cancel()
        return response

    first_post = asyncio.create_task(post_then_cancel_the_next())
    await wait_until(lambda: len(server.requests) == 1)
    victim = asyncio.create_task(client.post(b"2", 5.0))
    heir = asyncio.create_task(client.post(b"3", 5.0))
    await asyncio.sleep(0)
    gate.set()
    assert (await first_post).status == 200
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert (await asyncio.wait_for(heir, 2.0)).status == 200  # passed on, not lost
    assert [r[-1:] for r in server.requests] == [b"1", b"3"]
    assert (server.accepted, client.open_connections) == (1 if first == OK else 2, 1)


# -- idle connections --------------------------------------------------------------------------


async def test_idle_connection_expires(net: Net) -> None:
    server = await net.serve(OK)
    client = net.client(server, keepalive_seconds=0.05)
    await client.post(b"{}", 5.0)
    idle_from = time.monotonic()
    await wait_until(lambda: time.monotonic() - idle_from > 0.05)
    assert (await client.post(b"{}", 5.0)).body == b"ok"
    assert server.accepted == 2
    await wait_until(lambda: server.closed == 1)  # the expired one, closed by the client
    assert client.open_connections == 1


async def test_connection_closed_by_the_server_while_idle_is_skipped(net: Net) -> None:
    server = await net.serve(Close(OK), OK)
    client = net.client(server)
    await client.post(b"{}", 5.0)
    await wait_until(lambda: server.closed == 1)
    await asyncio.sleep(0)  # the client's turn to see the close
    assert (await client.post(b"{}", 5.0)).body == b"ok"
    assert (server.accepted, client.open_connections) == (2, 1)


@pytest.mark.parametrize("same_read", [False, True], ids=["later", "same-read"])
async def test_unsolicited_answer_drops_the_connection(net: Net, same_read: bool) -> None:
    spoke, extra = asyncio.Event(), b"HTTP/1.1 500 Oops\r\nContent-Length: 1000\r\n\r\n"

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(OK + extra if same_read else OK)
            await spoke.wait()
            await peer.send(b"" if same_read else extra)

    server = await net.serve(script=script)
    client = net.client(server)
    assert await client.post(b"{}", 5.0) == Response(200, [("content-length", "2")], b"ok")
    spoke.set()  # the answer is in: what comes now was not asked for
    await wait_until(lambda: server.closed == 1)
    assert await client.post(b"{}", 5.0) == Response(200, [("content-length", "2")], b"ok")
    assert server.accepted == 2


# -- construction and close --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kw", "match"),
    [
        ("ftp://127.0.0.1/ingest", {}, "not an http"),
        ("127.0.0.1:8080/ingest", {}, "not an http"),
        ("http:///ingest", {}, "not an http"),
        ("http://user:secret@127.0.0.1/ingest", {}, "credentials"),
        ("https://user@127.0.0.1/ingest", {}, "credentials"),
        ("http://127.0.0.1/ingest", {"limit": 0}, "limit"),
        ("http://127.0.0.1/ingest", {"headers": {"X-API-KEY": "k\r\nX-Evil: 1"}}, "X-API-KEY"),
        ("http://127.0.0.1/ingest", {"headers": {"X-API-KEY": "k\nX-Evil: 1"}}, "X-API-KEY"),
        ("http://127.0.0.1/ingest", {"headers": {"X-API-KEY": "k\0"}}, "X-API-KEY"),
        ("http://127.0.0.1/ingest", {"headers": {"X-Evil\r\n": "1"}}, "X-Evil"),
        ("http://127.0.0.1/ingest", {"user_agent": "relay\r\nX-Evil: 1"}, "User-Agent"),
    ],
)
def test_constructor_rejects(url: str, kw: dict[str, Any], match: str) -> None:
    kw = {"headers": {}, "limit": 1, "body_limit": 10, **kw}
    with pytest.raises(ValueError, match=match):
        Http1Client(url, kw.pop("headers"), **kw)


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
async def test_close_fails_requests_in_flight_and_after(
    net: Net, request: pytest.FixtureRequest, secure: bool
) -> None:
    released = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        # Not reading on: a TLS server then does not answer the client's close_notify.
        peer.writer.transport.pause_reading()
        await released.wait()
        peer.writer.transport.resume_reading()
        await peer.reader.read()

    server_tls, client_tls = request.getfixturevalue("tls") if secure else (None, None)
    server = await net.serve(script=script, ssl_context=server_tls)
    client = net.client(server, limit=1, ssl_context=client_tls)
    in_flight = asyncio.create_task(client.post(b"1", 60.0))
    await wait_until(lambda: len(server.requests) == 1)
    waiting = asyncio.create_task(client.post(b"2", 60.0))
    await asyncio.sleep(0)
    try:
        await client.close()
        for task in (in_flight, waiting):
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(task, 2.0)  # not left to the TLS shutdown
        with pytest.raises(ConnectionError):
            await client.post(b"3", 5.0)
        assert client.open_connections == 0
    finally:
        released.set()
    await wait_until(lambda: server.closed == 1)


# -- TLS and uvloop ----------------------------------------------------------------------------


async def test_tls_with_the_default_context_rejects_a_self_signed_certificate(
    net: Net, tls: Tls
) -> None:
    client = net.client(await net.serve(OK, ssl_context=tls[0]))  # not given tls[1]
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.post(b"{}", 5.0)
    assert client.open_connections == 0


@pytest.mark.parametrize(
    ("loop_factory", "secure"),
    [(asyncio.new_event_loop, True), (uvloop.new_event_loop, False), (uvloop.new_event_loop, True)],
    ids=["asyncio-https", "uvloop-http", "uvloop-https"],
)
def test_keep_alive_over_tls_and_uvloop(
    request: pytest.FixtureRequest,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    secure: bool,
) -> None:
    # uvloop's transports are not asyncio.Transport subclasses.
    server_tls, client_tls = request.getfixturevalue("tls") if secure else (None, None)

    async def main() -> tuple[list[bytes], int]:
        net = Net()
        try:
            server = await net.serve(OK, ssl_context=server_tls)
            client = net.client(server, ssl_context=client_tls)
            bodies = [(await client.post(b"{}", 5.0)).body for _ in range(3)]
            return bodies, server.accepted
        finally:
            await net.aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(main()) == ([b"ok"] * 3, 1)
