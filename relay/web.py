"""HTTP side: the Frotcom webhook, JSON error answers, and one log line per request.

The webhook answers 200 only after every position of the request is committed to the
outbox (as a row or in quarantine). Any storage failure is a 500 with nothing
acknowledged, so Frotcom sends the batch again.

Every webhook request leaves exactly one ``webhook_request`` line (status, counts, bytes,
duration, and the error if any) and carries a request id: the caller's ``X-Request-ID``
when it is sane, else a new one, bound into every log line of the request and returned
in the ``X-Request-ID`` response header.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from relay.frotcom import parse_body
from relay.health import PROBE_PATHS
from relay.mapping import BadRequest
from relay.outbox.storage import LowDiskSpace
from relay.state import OUTBOX, STATE

log = structlog.get_logger("relay.web")

# SPEC §1: the exact body Frotcom gets for any failure on our side.
INTERNAL_ERROR = "Internal server error"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-ID"
# What a caller's id may look like (UUIDs, proxies' hex ids); anything else is replaced
# rather than echoed into our logs and headers.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(slots=True)
class WebhookLine:
    """The fields of one request's ``webhook_request`` line, filled in by the handler."""

    positions: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    held: int = 0
    vehicles: int = 0
    bytes: int | None = None
    error: str | None = None


_line: contextvars.ContextVar[WebhookLine] = contextvars.ContextVar("webhook_line")


def request_id(offered: str | None) -> str:
    if offered is not None and _SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id for every request; the canonical line and metrics for the webhook's."""
    state = request.app[STATE]
    rid = request_id(request.headers.get(REQUEST_ID_HEADER))
    if request.path != state.config.server.path:
        with structlog.contextvars.bound_contextvars(request_id=rid):
            response = await handler(request)
        response.headers[REQUEST_ID_HEADER] = rid
        return response
    line = WebhookLine(bytes=request.content_length)
    token = _line.set(line)
    started = time.perf_counter()
    status: int | None = None
    try:
        with structlog.contextvars.bound_contextvars(request_id=rid):
            response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = rid
        return response
    except web.HTTPException as exc:  # only below 400: json_errors answers the rest
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = rid
        raise
    except (ConnectionError, asyncio.CancelledError) as exc:
        line.error = line.error or f"client went away: {type(exc).__name__}"
        raise
    finally:
        _line.reset(token)
        duration = time.perf_counter() - started
        state.metrics.webhook_answered("disconnected" if status is None else str(status), duration)
        _log_request(rid, request, status, line, duration)


def _log_request(
    rid: str, request: web.Request, status: int | None, line: WebhookLine, duration: float
) -> None:
    fields: dict[str, Any] = {
        "request_id": rid,
        "method": request.method,
        "status": status,
        "positions": line.positions,
        "accepted": line.accepted,
        "duplicates": line.duplicates,
        "quarantined": line.quarantined,
        "held": line.held,
        "vehicles": line.vehicles,
        "bytes": line.bytes,
        "duration_ms": round(duration * 1000, 2),
        "remote": request.remote,
    }
    if line.error is not None:
        fields["error"] = line.error
    if status is not None and status >= 500:
        log.error("webhook_request", **fields)
    elif status is None or status >= 400:
        log.warning("webhook_request", **fields)
    else:
        log.info("webhook_request", **fields)


def error(status: int, message: str, detail: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return web.json_response(body, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error an integrator can see is JSON, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        _note_error(exc.reason)
        detail = exc.text if exc.text != f"{exc.status}: {exc.reason}" else None
        response = error(exc.status, exc.reason, detail or _route_hint(request, exc))
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:
        # A bug, not bad input. A 500 makes Frotcom resend, which the outbox absorbs
        # even if the batch was already committed; the answer is still the documented JSON.
        log.exception("request_failed", method=request.method, path=request.path)
        _note_error("unexpected error (see request_failed)")
        return error(500, INTERNAL_ERROR)


def _route_hint(request: web.Request, exc: web.HTTPException) -> str | None:
    """What an integrator with a wrong URL or method needs to hear: where batches go."""
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    if exc.status == 405 and "Allow" in exc.headers:
        return f"{request.method} is not allowed on {path}; use {exc.headers['Allow']}"
    if exc.status == 404:
        state = request.app[STATE]
        hint = f"no route for {request.method} {path}; Frotcom batches go to POST"
        hint += f" {state.config.server.path}"
        if state.metrics_port is not None and request.path in PROBE_PATHS:
            hint += f"; {request.path} is served on the [metrics] port, {state.metrics_port}"
        return hint
    return None


def _note_error(text: str) -> None:
    line = _line.get(None)
    if line is not None and line.error is None:
        line.error = text


def token_ok(header: str | None, tokens: tuple[bytes, ...]) -> bool:
    if not header:
        return False
    offered = header.strip().encode("utf-8", "replace")
    # Compare against every token, without short-circuit, so timing says nothing
    # about which token (if any) came close.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(offered, token)
    return ok


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes (checked before parsing)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def ingest(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    line = _line.get(None) or WebhookLine()
    if not token_ok(request.headers.get("Authorization"), state.tokens):
        line.error = "missing or unknown Authorization token"
        return error(401, "unauthorized", line.error)
    body = await read_limited(request, config.server.max_body_bytes)
    if body is None:
        line.error = f"body exceeds {config.server.max_body_bytes} bytes"
        return error(413, "payload too large", line.error)
    line.bytes = len(body)
    received_ms = int(state.clock() * 1000)
    try:
        batch = parse_body(body, received_ms, int(config.frotcom.max_future_seconds * 1000))
    except BadRequest as exc:
        line.error = str(exc)
        return error(400, "bad request", str(exc))
    line.positions = batch.count + len(batch.rejected)
    line.vehicles = batch.vehicle_count
    state.stats["received"] += line.positions
    state.metrics.batch_parsed(line.positions)
    try:
        result = await request.app[OUTBOX].store_batch(
            batch, state.vehicles, config.cartrack.provider, received_ms
        )
    except LowDiskSpace as exc:
        state.stats["store_errors"] += 1
        state.metrics.store_failed()
        line.error = f"outbox low on disk space: {exc.strerror}"
        # 500, not 507: Frotcom retries 5xx, and the batch is welcome once space returns.
        return error(500, "outbox full", "the relay's disk is nearly full; retry later")
    except (sqlite3.Error, OSError) as exc:
        state.stats["store_errors"] += 1
        state.metrics.store_failed()
        line.error = f"outbox store failed: {type(exc).__name__}: {exc}"
        return error(500, INTERNAL_ERROR)
    state.stats["stored"] += result.accepted
    state.stats["duplicates"] += result.duplicates
    state.stats["quarantined"] += result.quarantined
    state.stats["held"] += result.held
    state.metrics.batch_stored(result)
    line.accepted = result.accepted
    line.duplicates = result.duplicates
    line.quarantined = result.quarantined
    line.held = result.held
    if state.forwarder is not None and result.vehicles:
        state.forwarder.notify(result.vehicles)
    counts = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "held": result.held,
        "quarantined": result.quarantined,
    }
    return web.json_response({"status": "success", **counts})


def add_routes(app: web.Application, path: str) -> None:
    app.router.add_post(path, ingest)
