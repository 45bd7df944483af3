"""A lean Cartrack stand-in: answers every POST with 200 as fast as one core can.

The devtools FakeCartrack validates and records each event, which is right for tests
but would make the stand-in the bottleneck here. This one parses just enough HTTP/1.1
(keep-alive, Content-Length) to answer, and counts. Both the relay and its ceiling (a
bare aiohttp client) post to it, so its own cost is the same on both sides.

``python -m bench.standin`` prints its port on the first line; ``GET /stats`` answers
the request count and, with ``?times=1``, every request's arrival time (epoch seconds).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
MAX_REQUESTS = 5_000_000  # bounded memory for the arrival times


class Stats:
    def __init__(self) -> None:
        self.times: list[float] = []

    def answer(self, query: bytes) -> bytes:
        body: dict[str, object] = {"count": len(self.times)}
        if self.times:
            body["first"] = self.times[0]
            body["last"] = self.times[-1]
        if b"times=1" in query:
            body["times"] = self.times
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        return head.encode() + data


class Http(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            length = 0
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            if lines[0].startswith(b"GET /stats"):
                self.transport.write(self.stats.answer(lines[0]))
            else:
                if len(self.stats.times) < MAX_REQUESTS:
                    self.stats.times.append(time.time())
                self.transport.write(OK)


async def main() -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(lambda: Http(stats), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Bounded: a stand-in left behind by a crashed bench ends on its own.
    try:
        await asyncio.wait_for(stop.wait(), timeout=3600)
    except TimeoutError:
        print("stand-in: one-hour bound reached", file=sys.stderr)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
