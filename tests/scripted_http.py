"""Raw asyncio HTTP servers scripted byte by byte, for tests/test_http1.py.

Each server records every request exactly as sent and counts the connections it
accepts, has open at once and closes; ``Net`` closes servers and clients at the end of
a test and fails it if a script broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from relay.http1 import Http1Client

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CLOSE_OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


class Close(bytes):
    """An answer after which the server closes the connection (empty: close at once)."""


class Stall(bytes):
    """An answer after which the server sends nothing more until the client hangs up."""


@dataclass
class Peer:
    """The server's end of one connection."""

    server: Server
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> bytes | None:
        """The next request exactly as sent, or None once the client has hung up."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = int(head.lower().split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
        self.server.requests.append(head + await self.reader.readexactly(length))
        return self.server.requests[-1]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Script = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, script: Script, tls: bool) -> None:
        self.script, self.tls, self.port = script, tls, 0
        self.requests: list[bytes] = []
        self.accepted = self.closed = self.open = self.most_open = 0
        self.errors: list[BaseException] = []
        self.handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/ingest"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.script(Peer(self, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up mid-answer: the tests check what the client saw
        except Exception as exc:
            self.errors.append(exc)  # a broken script fails the test at teardown
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self.open -= 1
            self.closed += 1


def answering(*answers: bytes, gate: asyncio.Event | None = None, dribble: bool = False) -> Script:
    """Answer the server's n-th request with answers[n] (the last one repeats)."""

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            answer = answers[min(len(peer.server.requests), len(answers)) - 1]
            if gate is not None:
                await gate.wait()
            for piece in [answer[i : i + 1] for i in range(len(answer))] if dribble else [answer]:
                await peer.send(piece)
                if dribble:
                    await asyncio.sleep(0)  # the client reads each byte on its own
            if isinstance(answer, Stall):
                await peer.reader.read()
            if isinstance(answer, Close | Stall):
                return

    return script


class Net:
    """Scripted servers and clients, all closed at the end of the test."""

    def __init__(self) -> None:
        self.servers: list[tuple[asyncio.Server, Server]] = []
        self.clients: list[Http1Client] = []

    async def serve(
        self, *answers: bytes, script: Script | None = None, ssl_context: Any = None, **kw: Any
    ) -> Server:
        server = Server(script or answering(*answers, **kw), tls=ssl_context is not None)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ssl_context)
        server.port = listener.sockets[0].getsockname()[1]
        self.servers.append((listener, server))
        return server

    def client(self, target: Server | str, **kw: Any) -> Http1Client:
        kw = {"limit": 4, "body_limit": 1024, **kw}
        url = target.url if isinstance(target, Server) else target
        self.clients.append(client := Http1Client(url, kw.pop("headers", {}), **kw))
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()
        for listener, server in self.servers:
            listener.close()
            await listener.wait_closed()
            # The clients' close ends every script; one still running fails here.
            await asyncio.wait_for(asyncio.gather(*server.handlers), 5.0)
            assert not server.errors
