"""HTTP side: the Frotcom webhook and small health endpoint, plus JSON error answers.

The webhook answers 200 only after every position of the request is committed to the
outbox (as a row or in quarantine). Any storage failure is a 500 with nothing
acknowledged, so Frotcom sends the batch again.
"""

from __future__ import annotations

import hmac
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from relay.mapping import BadRequest, decode_body, parse_batch
from relay.outbox.storage import LowDiskSpace
from relay.state import OUTBOX, STATE

log = structlog.get_logger("relay.web")

# SPEC §1: the exact body Frotcom gets for any failure on our side.
INTERNAL_ERROR = "Internal server error"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        response = error(
            exc.status, exc.reason, exc.text if exc.text != f"{exc.status}: {exc.reason}" else None
        )
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:
        # A bug, not bad input. A 500 makes Frotcom resend, which the outbox absorbs
        # even if the batch was already committed; the answer is still the documented JSON.
        log.exception("request_failed", method=request.method, path=request.path)
        return error(500, INTERNAL_ERROR)


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
    started = time.perf_counter()
    if not token_ok(request.headers.get("Authorization"), state.tokens):
        log.warning("webhook_unauthorized", remote=request.remote)
        return error(401, "unauthorized", "missing or unknown Authorization token")
    body = await read_limited(request, config.server.max_body_bytes)
    if body is None:
        log.warning("webhook_too_large", limit=config.server.max_body_bytes)
        return error(413, "payload too large", f"body exceeds {config.server.max_body_bytes} bytes")
    received_ms = int(state.clock() * 1000)
    try:
        batch = parse_batch(
            decode_body(body), received_ms, int(config.frotcom.max_future_seconds * 1000)
        )
    except BadRequest as exc:
        log.warning("webhook_bad_request", detail=str(exc), bytes=len(body))
        return error(400, "bad request", str(exc))
    state.stats["received"] += len(batch.positions) + len(batch.rejected)
    try:
        result = await request.app[OUTBOX].store_batch(
            batch, state.vehicles, config.cartrack.provider, received_ms
        )
    except LowDiskSpace as exc:
        state.stats["store_errors"] += 1
        log.error("outbox_low_space", free_bytes=exc.free, min_free_bytes=exc.minimum)
        # 500, not 507: Frotcom retries 5xx, and the batch is welcome once space returns.
        return error(500, "outbox full", "the relay's disk is nearly full; retry later")
    except (sqlite3.Error, OSError) as exc:
        state.stats["store_errors"] += 1
        log.error(
            "batch_store_failed",
            error=f"{type(exc).__name__}: {exc}",
            positions=len(batch.positions),
            quarantined=len(batch.rejected),
        )
        return error(500, INTERNAL_ERROR)
    state.stats["stored"] += result.accepted
    state.stats["duplicates"] += result.duplicates
    state.stats["quarantined"] += result.quarantined
    state.stats["held"] += result.held
    if state.forwarder is not None and result.vehicles:
        state.forwarder.notify(result.vehicles)
    counts = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "held": result.held,
        "quarantined": result.quarantined,
    }
    log.info(
        "batch_stored",
        **counts,
        vehicles=len({p.vehicle_id for p in batch.positions}),
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return web.json_response({"status": "success", **counts})


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    forwarder = state.forwarder
    running = (
        forwarder is not None
        and state.forwarder_task is not None
        and not state.forwarder_task.done()
    )
    body = {
        "status": "ok" if running else "degraded",
        "forwarder": "paused"
        if forwarder and forwarder.pause
        else ("running" if running else "stopped"),
    }
    return web.json_response(body, status=200 if running else 503)


def add_routes(app: web.Application, path: str) -> None:
    app.router.add_post(path, ingest)
    app.router.add_get("/healthz", healthz)
