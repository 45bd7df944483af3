"""A fake Cartrack ingestion endpoint (SPEC §2): a real local HTTP server for demo and tests.

It validates strictly (no extra keys, complete telemetry, no future timestamps), records every
request, and can be scripted to misbehave (5xx, Retry-After, slow answers, dropped connections)
so the relay's retry paths run against real sockets rather than mocks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.client import responses
from typing import Any

import structlog
from aiohttp import web

INGEST_PATH = "/api/data/ingest/telematics"
EVENT_TYPES = ("IGNITION_ON", "IGNITION_OFF", "PERIODIC")
# ISO 3779: 17 characters, digits and capital letters except I, O and Q.
VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}")
# Cartrack wants UTC spelled with "Z"; offsets like +00:00 are rejected so that the relay's
# normalisation (SPEC §2 "Precise rules") is actually tested.
_ISO_Z_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z")

log = structlog.get_logger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _parse_iso_z(value: str) -> datetime | None:
    # The regex pins the shape; fromisoformat then rejects impossible dates like month 13.
    try:
        return datetime.fromisoformat(value) if _ISO_Z_RE.fullmatch(value) else None
    except ValueError:
        return None


# A field check takes the field's path and value and returns errors naming that path.
_Check = Callable[[str, object], list[str]]


def _number(low: float | None = None, high: float | None = None) -> _Check:
    def check(path: str, value: object) -> list[str]:
        # bool is an int subclass, but true/false is never a valid coordinate or speed.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [f"{path}: must be a number"]
        if isinstance(value, float) and not math.isfinite(value):
            return [f"{path}: must be a finite number"]
        if low is not None and value < low:
            return [f"{path}: must be >= {low:g}"]
        if high is not None and value > high:
            return [f"{path}: must be <= {high:g}"]
        return []

    return check


def _rule(test: Callable[[object], bool], message: str) -> _Check:
    return lambda path, value: [] if test(value) else [f"{path}: {message}"]


_text = _rule(lambda v: isinstance(v, str) and bool(v.strip()), "must be a non-empty string")
_boolean = _rule(lambda v: isinstance(v, bool), "must be a boolean")
_timestamp = _rule(
    lambda v: isinstance(v, str) and _parse_iso_z(v) is not None,
    "must be ISO-8601 UTC ending in Z",
)
_event_type = _rule(lambda v: v in EVENT_TYPES, f"must be one of {', '.join(EVENT_TYPES)}")


def _vin(path: str, value: object) -> list[str]:
    if not isinstance(value, str):
        return [f"{path}: must be a string"]
    if len(value) != 17:
        return [f"{path}: must be exactly 17 characters"]
    if not VIN_RE.fullmatch(value):
        return [f"{path}: invalid VIN characters (0-9, A-Z except I, O, Q)"]
    return []


def _object(
    required: dict[str, _Check], optional: dict[str, _Check], missing: str = "required"
) -> _Check:
    """Check an object: required fields present, each field valid, and no other keys."""

    def check(path: str, value: object) -> list[str]:
        if not isinstance(value, dict):
            return [f"{path or 'event'}: must be an object"]
        prefix = f"{path}." if path else ""
        errors = [f"unexpected key: {prefix}{key}" for key in value if key not in fields]
        for key, field_check in fields.items():
            if key in value:
                errors += field_check(prefix + key, value[key])
            elif key in required:
                errors.append(f"{prefix}{key}: {missing}")
        return errors

    fields = required | optional
    return check


_SOURCE = _object(
    {"provider": _text},
    {"device_id": _text, "provider_event_id": _text, "provider_received_ts": _timestamp},
)
# Every event the relay sends is a location event, so position is always required.
_POSITION = _object(
    {"latitude": _number(-90, 90), "longitude": _number(-180, 180)}, {"altitude": _number()}
)
# Cartrack's one cross-field rule: telemetry is all-or-nothing for these three.
_TELEMETRY = _object(
    {"speed": _number(0), "ignition": _boolean, "odometer": _number(0)},
    {"rpm": _number(0)},
    missing="required when telemetry is present",
)
_EVENT = _object(
    {
        "event_type": _event_type,
        "event_ts": _timestamp,
        "chassis_number": _vin,
        "source": _SOURCE,
        "position": _POSITION,
    },
    {"telemetry": _TELEMETRY},
)


def validate_event(
    event: object, now: datetime, tolerance: timedelta = timedelta(seconds=60)
) -> list[str]:
    """Check one event against Cartrack's specification; return readable errors (empty = valid).

    Every error starts with the field path it concerns, so a 422 body tells the operator
    exactly which mapping rule of the relay produced a bad field.
    """
    errors = _EVENT("", event)
    event_ts = event.get("event_ts") if isinstance(event, dict) else None
    parsed = _parse_iso_z(event_ts) if isinstance(event_ts, str) else None
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    if parsed is not None and parsed > now + tolerance:
        errors.append("event_ts: in the future")
    return errors


@dataclass
class Response:
    """A scripted answer. ``drop`` closes the connection without any HTTP response."""

    status: int
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


Responder = Callable[[dict[str, Any] | None], Response | int | None]
Script = int | Response | Responder


@dataclass
class Received:
    """One request as the fake saw it; ``status`` is 0 when the connection was dropped."""

    time: float
    headers: dict[str, str]
    body: bytes
    event: object | None
    status: int
    errors: list[str] = field(default_factory=list)


def _event_id(event: object) -> str | None:
    source = event.get("source") if isinstance(event, dict) else None
    event_id = source.get("provider_event_id") if isinstance(source, dict) else None
    return event_id if isinstance(event_id, str) else None


def _json_response(response: Response) -> web.Response:
    status, body = response.status, response.body
    if body is None:
        # A bare scripted status still gets a JSON body, as a real API gateway would send.
        phrase = responses.get(status, f"HTTP {status}")
        body = {"status": "accepted"} if 200 <= status < 300 else {"error": phrase}
    if isinstance(body, str):
        return web.Response(status=status, text=body, headers=response.headers)
    return web.json_response(body, status=status, headers=response.headers)


class FakeCartrack:
    """A local Cartrack ingestion server that records every request and can be scripted."""

    # Handlers may be parked in a long scripted delay; stop() should not wait for them.
    shutdown_timeout: float = 0.5

    def __init__(
        self,
        api_key: str | None = None,
        vins: Collection[str] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        latency: float = 0.0,
        *,
        on_request: Callable[[Received], None] | None = None,
    ) -> None:
        self.api_key = api_key
        self.vins = frozenset(vins) if vins is not None else None
        self.clock = clock
        self.latency = latency
        self.on_request = on_request
        self.requests: list[Received] = []
        self.accepted: list[dict[str, Any]] = []
        self.stats: Counter[int] = Counter()
        self.duplicates = 0
        self.url: str | None = None
        self.port: int | None = None
        self._script: deque[Script] = deque()
        self._default: Responder | None = None
        self._seen_ids: set[str] = set()
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeCartrack:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def script(self, *responses: Script) -> None:
        """Queue answers, one per request, consulted before normal validation."""
        self._script.extend(responses)

    def set_default(self, responder: Responder | None) -> None:
        """Install a persistent rule used when the script queue is empty (None = normal)."""
        self._default = responder

    def ids(self) -> list[str]:
        """provider_event_id of every accepted event, in acceptance order."""
        # Scripted 2xx answers can accept events without an id; those are skipped.
        return [eid for event in self.accepted if (eid := _event_id(event)) is not None]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(INGEST_PATH, self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port); return the full ingest URL."""
        if self._runner is not None:
            raise RuntimeError("FakeCartrack is already running")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.port}{INGEST_PATH}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def wait_for(
        self,
        predicate: Callable[[FakeCartrack], bool],
        timeout: float = 10.0,
    ) -> None:
        """Return once predicate(self) holds; re-checked after every request, no polling.

        Takes a timeout (not asyncio.timeout at the call site) so that the TimeoutError can
        report what the fake did receive, which is what makes a failing test readable.
        """
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: predicate(self))
            except TimeoutError:
                counts = ", ".join(f"{s}: {n}" for s, n in sorted(self.stats.items())) or "none"
                raise TimeoutError(
                    f"FakeCartrack condition not met within {timeout:g}s: "
                    f"{len(self.requests)} requests, {len(self.accepted)} accepted, "
                    f"{self.duplicates} duplicates, statuses {{{counts}}}"
                ) from None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body = await request.read()
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        event: object | None = None
        parse_error: str | None = None
        try:
            event = json.loads(body)
        except ValueError as exc:  # includes UnicodeDecodeError
            parse_error = str(exc)
        record = Received(arrived, dict(request.headers), body, event, status=0)
        response = self._scripted(event)
        if response is None:
            response = self._normal(request, event, parse_error, record)
        elif 200 <= response.status < 300 and isinstance(event, dict) and not response.drop:
            self._accept(event)
        record.status = 0 if response.drop else response.status
        # Recorded before any delay: a slow answer models "Cartrack committed it, but the
        # relay timed out", whose retry must then be answered 409.
        await self._record(record)
        if response.delay > 0:
            await asyncio.sleep(response.delay)
        if response.drop:
            if request.transport is not None:
                request.transport.close()
            # aiohttp swallows the write failure on the closed transport; nothing is sent.
            return web.Response(status=204)
        return _json_response(response)

    def _scripted(self, event: object | None) -> Response | None:
        payload = event if isinstance(event, dict) else None
        answer: Response | int | None = None
        if self._script:
            # A callable that declines (None) still consumes its slot: the queue stays
            # "one entry per request", so tests can reason about which request got what.
            item = self._script.popleft()
            answer = item(payload) if callable(item) else item
        elif self._default is not None:
            answer = self._default(payload)
        return Response(answer) if isinstance(answer, int) else answer

    def _normal(
        self, request: web.Request, event: object | None, parse_error: str | None, record: Received
    ) -> Response:
        key = request.headers.get("X-API-KEY")
        if not key or (self.api_key is not None and key != self.api_key):
            record.errors = ["X-API-KEY: missing or wrong"]
            return Response(401, {"error": "invalid or missing X-API-KEY"})
        if parse_error is not None:
            record.errors = [f"body: not JSON ({parse_error})"]
            return Response(400, {"error": "invalid JSON", "detail": parse_error})
        record.errors = validate_event(event, self.clock())
        if record.errors:
            return Response(422, {"error": "validation failed", "details": record.errors})
        assert isinstance(event, dict)  # validate_event guarantees it
        vin = event["chassis_number"]
        if self.vins is not None and vin not in self.vins:
            record.errors = [f"chassis_number: vehicle {vin} not found"]
            return Response(404, {"error": "vehicle not found", "chassis_number": vin})
        event_id = _event_id(event)
        if event_id is not None and event_id in self._seen_ids:
            self.duplicates += 1
            return Response(409, {"error": "duplicate event", "provider_event_id": event_id})
        return Response(202, {"status": "accepted", "id": self._accept(event)})

    def _accept(self, event: dict[str, Any]) -> str:
        self.accepted.append(event)
        if (event_id := _event_id(event)) is not None:
            self._seen_ids.add(event_id)
        return f"evt-{next(self._ids):08d}"

    async def _record(self, record: Received) -> None:
        self.requests.append(record)
        self.stats[record.status] += 1
        if self.on_request is not None:
            self.on_request(record)
        async with self._changed:
            self._changed.notify_all()


def _log_request(record: Received) -> None:
    # Headers are deliberately not logged: they carry the API key.
    if not 200 <= record.status < 300:
        eid = _event_id(record.event)
        log.warning("fake_cartrack_rejected", status=record.status, id=eid, errors=record.errors)


async def run_fake_cartrack(host: str, port: int, api_key: str | None, stop: asyncio.Event) -> None:
    """Serve a FakeCartrack until ``stop`` is set (the ``fake-cartrack`` command)."""
    fake = FakeCartrack(api_key=api_key, on_request=_log_request)
    url = await fake.start(host, port)
    log.info("fake_cartrack_listening", url=url, api_key_required=api_key is not None)
    try:
        await stop.wait()
    finally:
        await fake.stop()
        log.info("fake_cartrack_stopped", requests=len(fake.requests), stats=dict(fake.stats))
