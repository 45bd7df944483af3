"""A lean HTTP/1.1 client for one origin: keep-alive POSTs, bounded answers.

The forwarder sends one small JSON event per request, so the cost of a request is
almost all client machinery. aiohttp's ``ClientSession.post`` costs 80-90 us of CPU
per request on this project's bench machine; this client, asyncio's transports with
httptools' parser (llhttp, the parser Node.js uses) and nothing else, costs about 30
(``bench/README.md``, "The forward path, third pass"). It does only what the Cartrack
client needs:

- POST to one URL (``http://`` or ``https://``, certificates verified), a fixed set of
  headers, a body with a Content-Length;
- a pool of keep-alive connections, at most ``limit`` open, the most recently used
  first; a connection idle for ``keepalive_seconds`` is not used again (it is closed
  when the pool next looks at it), before the server is likely to drop it;
- one deadline per request, covering the wait for a connection, connecting, sending
  and the whole answer;
- the answer's status, its headers, and at most ``body_limit`` bytes of its body. A
  body past 64 KiB is not read to its end: its connection is closed, not reused.

Redirects are not followed, cookies are not kept, nothing is decompressed (the
client does not ask for compression). Errors are ``ConnectionError`` (and the rest of
``OSError``: refused, reset, TLS) or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["Http1Client", "ProtocolError", "Response", "ServerDisconnected"]

# Past this much body the answer is cut off and its connection closed: an error page
# the relay keeps 1 KiB of must not be read to its end, however long it is.
_DRAIN_LIMIT = 64 * 1024


class ServerDisconnected(ConnectionError):
    """The server closed the connection before its answer's headers were complete."""


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x."""


@dataclass(slots=True)
class Response:
    status: int
    # (name, value) as sent, names in lower case; latin-1, as HTTP/1.1 allows.
    headers: list[tuple[str, str]]
    body: bytes  # at most the client's body_limit bytes
    # Why the body broke off ("" when it did not); a body longer than the limit is
    # cut at the limit without a note.
    cut: str = ""

    def header(self, name: str) -> str | None:
        """The first header of that name (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Http1Client:
    """POSTs to ``url`` over a pool of at most ``limit`` keep-alive connections."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        limit: int,
        body_limit: int,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "cartrack-relay",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL are not supported")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        fields = {"Host": parts.netloc, "User-Agent": user_agent, **headers}
        for name, value in fields.items():
            if any(c in "\r\n\0" for c in name + value):
                # A line break would end the header and start another: never sent.
                raise ValueError(f"header {name}: line breaks and NUL are not allowed")
        lines = [f"POST {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
        head = "\r\n".join(lines) + "\r\nContent-Length: "
        # Everything up to the length, encoded once: a request is this, the length
        # and the body, written in one call.
        self._head = head.encode("latin-1")
        self._limit = limit
        self.body_limit = body_limit
        self.keepalive_seconds = keepalive_seconds
        self._idle: list[_Connection] = []
        self._conns: set[_Connection] = set()  # every open connection, idle or busy
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    async def post(self, body: bytes, timeout: float) -> Response:
        """Send ``body``; the answer, or TimeoutError after ``timeout`` seconds in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._take_idle()
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self._acquire()
        try:
            response = await conn.exchange(self._head + b"%d\r\n\r\n" % len(body) + body, deadline)
        except BaseException:
            self._release(conn, reuse=False)
            raise
        self._release(conn, reuse=conn.reusable)
        return response

    async def close(self) -> None:
        """Close every connection; requests in flight fail with ConnectionError."""
        self._closed = True
        for conn in self._conns:
            conn.close()
        # Connections still being opened count themselves out when they find the
        # client closed; these are gone now.
        self._open -= len(self._conns)
        self._conns.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("client closed"))
        # Give the transports their turn to close before the loop goes away.
        await asyncio.sleep(0)

    @property
    def open_connections(self) -> int:
        return self._open

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and now - conn.idle_since < self.keepalive_seconds:
                return conn
            self._discard(conn)
        return None

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise ConnectionError("client closed")
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one(None)
                    raise
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed a connection just as we gave up: pass it on.
                    passed = waiter.result()
                    if passed is not None:
                        self._release(passed, reuse=True)
                    else:
                        self._wake_one(None)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise
            if handed is not None:
                return handed
            # None: a slot came free (a connection closed); loop round to open one.

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Connection(self.body_limit),
            self.host,
            self.port,
            ssl=self._ssl,
            server_hostname=self.host if self._ssl is not None else None,
        )
        if self._closed:
            conn.close()
            raise ConnectionError("client closed")
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            if not self._wake_one(conn):
                self._idle.append(conn)
            return
        self._discard(conn)
        self._wake_one(None)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        if conn in self._conns:
            self._conns.remove(conn)
            self._open -= 1

    def _wake_one(self, conn: _Connection | None) -> bool:
        """Hand ``conn`` (or, with None, a free slot) to the first request still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it comes."""

    def __init__(self, body_limit: int) -> None:
        self._body_limit = body_limit
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._headers_done = False
        self._body: list[bytes] = []
        self._size = 0  # body bytes received, kept or not
        self._keep_alive = False
        self._lost = False
        self.reusable = False
        self.idle_since = 0.0

    # -- the pool's side ------------------------------------------------------------

    def exchange(self, request: bytes, deadline: float) -> asyncio.Future[Response]:
        if self._lost or self._transport is None:
            raise ServerDisconnected("the connection is closed")
        loop = asyncio.get_running_loop()
        self.reusable = False
        self._reset()
        waiter = self._waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._timed_out)
        self._transport.write(request)
        return waiter

    def close(self) -> None:
        # A request still waiting fails now: its deadline goes with the timer, and a
        # TLS transport reports the loss only once the peer has answered its
        # close_notify (or ssl_shutdown_timeout, 30 s, has passed).
        self._fail(ConnectionError("client closed"))
        if self._transport is not None:
            self._transport.close()

    # -- asyncio's side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Nothing was asked: a server talking out of turn cannot be trusted with
            # the next request.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))
            self.close()
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: what follows is not HTTP/1.1 (not an
            # HttpParserError, and it must not escape into the event loop).
            self._fail(ProtocolError("malformed HTTP answer: the server switched protocols"))
            self.close()

    def eof_received(self) -> bool | None:
        # The server has closed its end. connection_lost comes a loop turn later; a
        # request put on the connection meanwhile would be lost with it.
        self.reusable = False
        return None  # close ours too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.reusable = False
        if self._waiter is None:
            return
        if self._headers_done:
            # The status is in, and it decides what happens to the event: a body
            # that breaks off must not turn an accepted event into a retry. With
            # neither a length nor chunks, the close is how the body ends.
            cut = ""
            if self._framed():
                cut = f" [body read failed: {type(exc).__name__ if exc else 'connection closed'}]"
            self._finish(cut)
        else:
            reason = f"{type(exc).__name__}: {exc}" if exc else "closed by the server"
            self._fail(ServerDisconnected(f"server disconnected before answering ({reason})"))

    # -- httptools' callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer right behind the one asked for, in the same read: parsed
            # on, it would add to the answer just returned and leave the parser
            # half-way into the next. Stop here; data_received closes the connection.
            raise httptools.HttpParserError("an answer nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True

    def on_body(self, chunk: bytes) -> None:
        room = self._body_limit - self._size
        if room > 0:
            self._body.append(chunk if len(chunk) <= room else chunk[:room])
        self._size += len(chunk)
        if self._size > _DRAIN_LIMIT and self._waiter is not None:
            # The status and the start are what matter; reading on would only
            # keep the connection for reuse.
            self._finish("")
            self.close()

    def on_message_complete(self) -> None:
        if self._waiter is None:  # already answered: cut off, or timed out
            return
        if self._status < 200:
            # 100 Continue, 103 Early Hints: the answer proper follows.
            self._reset()
            return
        self.reusable = self._keep_alive
        self._finish("")

    # -- inside ----------------------------------------------------------------------

    def _framed(self) -> bool:
        return any(k in ("content-length", "transfer-encoding") for k, _ in self._headers)

    def _reset(self) -> None:
        self._status = 0
        self._headers = []
        self._headers_done = False
        self._body = []
        self._size = 0

    def _finish(self, cut: str) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is None or waiter.done():
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result(Response(self._status, self._headers, body, cut))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError())
        self.close()
