"""Shared by the forwarder's tests: vehicles, event ids and the app on a fake Cartrack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import BASE_MS, batch, position, post_batch, rows

from relay.devtools.fake_cartrack import FakeCartrack, Received, Response
from relay.outbox.storage import Outbox
from relay.timeutil import format_ms


def ts(i: int) -> str:
    return format_ms(BASE_MS + i * 1000)


def pid(vehicle: str, i: int) -> str:
    return f"frotcom:{vehicle}:{ts(i)}"


def eid(event: object) -> str | None:
    if not isinstance(event, dict):
        return None
    return str(event["source"]["provider_event_id"])


def device(event: object) -> str | None:
    return str(event["source"]["device_id"]) if isinstance(event, dict) else None


def requests_for(fake: FakeCartrack, event_id: str) -> list[Received]:
    return [r for r in fake.requests if eid(r.event) == event_id]


def accepted_for(fake: FakeCartrack, vehicle: str) -> list[str]:
    return [e for e in fake.ids() if e.split(":")[1] == vehicle]


def fail_first(event_id: str, answers: list[Response]) -> Callable[[Any], Response | None]:
    """A responder answering ``event_id``'s first requests with ``answers``, then normally."""
    queue = list(answers)

    def respond(event: Any) -> Response | None:
        if eid(event) == event_id and queue:
            return queue.pop(0)
        return None

    return respond


def status_of(db: Path) -> dict[str, str]:
    return {r["provider_event_id"]: r["status"] for r in rows(db)}


def all_sent(db: Path, count: int) -> Callable[[], bool]:
    def check() -> bool:
        found = rows(db)
        return len(found) == count and all(r["status"] == "sent" for r in found)

    return check


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def post_ok(client: TestClient, *messages: tuple[str, list[dict[str, Any]]]) -> Any:
    status, body = await post_batch(client, batch(*messages))
    assert status == 200, body
    return body


def positions(*indexes: int) -> list[dict[str, Any]]:
    return [position(ts(i)) for i in indexes]


@dataclass
class Calls:
    made: int = 0
    failed: int = 0


def failing(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    fails: Callable[[int], bool],
    error: Callable[[], BaseException],
) -> Calls:
    """``Outbox.<method>`` raising ``error()`` on the calls (counted from 1) where ``fails``."""
    original = getattr(Outbox, method)
    calls = Calls()

    async def flaky(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        calls.made += 1
        if fails(calls.made):
            calls.failed += 1
            raise error()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, method, flaky)
    return calls
