"""Typed application keys and the small mutable state the handlers and tasks share."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from relay.config import Config
from relay.metrics import RelayMetrics
from relay.timeutil import Clock

if TYPE_CHECKING:
    from relay.forwarder import Forwarder
    from relay.outbox.storage import Outbox


@dataclass
class RelayState:
    config: Config
    clock: Clock
    vehicles: Mapping[str, str]
    tokens: tuple[bytes, ...]
    stats: Counter[str] = field(default_factory=Counter)
    # Per app, never the global registry: several apps may run in one (test) process.
    metrics: RelayMetrics = field(default_factory=RelayMetrics)
    forwarder: Forwarder | None = None
    forwarder_task: asyncio.Task[None] | None = None
    # Resolved with the exception of the first supervised task that dies; `serve`
    # waits on it and exits non-zero so systemd restarts us.
    fatal: asyncio.Future[BaseException] | None = None
    # loop.time() when shutdown began: the forwarder's bound counts from here, so it
    # runs alongside the HTTP drain instead of after it.
    stopping_since: float | None = None
    # The bound port of the separate /metrics listener, when [metrics] port is set.
    metrics_port: int | None = None


STATE = web.AppKey("state", RelayState)
OUTBOX: web.AppKey[Outbox] = web.AppKey("outbox")
