"""Prometheus metrics: one registry per app, the agreed metric names, a small recording API.

Counters and histograms are updated where things happen (web.py, forwarder.py, the
Cartrack client's response hook). Outbox gauges are read at scrape time from the SQLite
file through a read-only connection of their own, in a worker thread: under WAL a reader
neither waits for nor holds up the daemon's writes, and the queries are index-only
(measured on 1M rows, 20k of them pending/failed: 0.3 ms per pending/failed count,
0.6-1.3 ms for the oldest pending, 40-130 ms for the sent count on a loaded 2-core
machine), so a scrape never stands in the way of ingest.

Names are a contract with the dashboards and alerts in contrib/: change none of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.outbox.schema import OutboxError, connect, status_counts
from relay.timeutil import parse_timestamp

if TYPE_CHECKING:
    from relay.outbox.storage import StoreResult

STATUSES = ("pending", "held", "failed", "sent")
# What ``read_outbox`` raises when the file cannot be read right now.
OUTBOX_READ_ERRORS = (sqlite3.Error, OutboxError, OSError, ValueError)
# Webhook answers: fsync-bound commits of up to thousands of rows; 5 s is the outbox's
# busy timeout, so anything above it is a request that waited on a lock.
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Cartrack round trips, up to beyond the default cartrack.timeout_seconds (10).
CARTRACK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class OutboxSnapshot:
    counts: dict[str, int]
    oldest_pending_age: float | None  # seconds; None when nothing is pending


def read_outbox(path: Path, now_ms: int) -> OutboxSnapshot:
    """Row counts by status and the oldest pending position's age, in one read snapshot.

    Blocking: call it from a worker thread. The age is measured from the position's own
    timestamp, as ``cartrack-relay status`` reports it, and is never negative (a pending
    row may be a position from the near future, waiting until it is due).
    """
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        # Each count reads only its status's partial index, never the table.
        counts = status_counts(conn)
        oldest = _one(conn, "positions_pending", "pending", "min(event_ts)")
        conn.execute("COMMIT")
    finally:
        conn.close()
    age = None if oldest is None else max(0.0, (now_ms - parse_timestamp(oldest)) / 1000)
    return OutboxSnapshot(counts, age)


def _one(conn: sqlite3.Connection, index: str, status: str, what: str) -> Any:
    sql = f"SELECT {what} FROM positions INDEXED BY {index} WHERE status = '{status}'"
    return conn.execute(sql).fetchone()[0]


class RelayMetrics:
    """The relay's metrics on a registry of its own (several apps may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "relay_positions_received",
            "Positions and quarantined entries in webhook bodies that parsed.",
            registry=r,
        )
        self.stored = Counter(
            "relay_positions_stored",
            "New outbox rows, held ones included.",
            registry=r,
        )
        self.duplicates = Counter(
            "relay_positions_duplicate",
            "Positions already in the outbox (re-sent batches).",
            registry=r,
        )
        self.quarantined = Counter(
            "relay_positions_quarantined",
            "Invalid entries quarantined, counted per request.",
            registry=r,
        )
        self.held = Counter(
            "relay_positions_held", "Positions stored as held: vehicle without a VIN.", registry=r
        )
        self.webhook_requests = Counter(
            "relay_webhook_requests",
            "Webhook requests by the HTTP status answered.",
            ["status"],
            registry=r,
        )
        self.webhook_ack = Histogram(
            "relay_webhook_ack_seconds",
            "Time from request to its 200, i.e. until the batch is committed.",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "relay_outbox_store_errors",
            "Webhook batches the outbox could not store (500).",
            registry=r,
        )
        self.sent = Counter("relay_events_sent", "Events Cartrack accepted (2xx, 409).", registry=r)
        self.failed = Counter(
            "relay_events_failed", "Events dead-lettered, by reason.", ["reason"], registry=r
        )
        self.retried = Counter(
            "relay_events_retried",
            "Failed attempts to be retried, by reason.",
            ["reason"],
            registry=r,
        )
        self.cartrack_responses = Counter(
            "relay_cartrack_responses",
            "Cartrack answers: HTTP status, or timeout / connection_error.",
            ["status"],
            registry=r,
        )
        self.cartrack_seconds = Histogram(
            "relay_cartrack_request_seconds",
            "Duration of one request to Cartrack, whatever its outcome.",
            buckets=CARTRACK_BUCKETS,
            registry=r,
        )
        Gauge("relay_build_info", "The running version.", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self._responses: dict[str, Counter] = {}
        self.outbox: OutboxSnapshot | None = None
        self.paused: Callable[[], bool] = lambda: False
        r.register(_LiveCollector(self))

    # -- ingest --------------------------------------------------------------------------

    def batch_parsed(self, entries: int) -> None:
        self.received.inc(entries)

    def batch_stored(self, result: StoreResult) -> None:
        self.stored.inc(result.accepted)
        self.duplicates.inc(result.duplicates)
        self.quarantined.inc(result.quarantined)
        self.held.inc(result.held)

    def store_failed(self) -> None:
        self.store_errors.inc()

    def webhook_answered(self, status: str, seconds: float) -> None:
        self.webhook_requests.labels(status).inc()
        if status == "200":
            self.webhook_ack.observe(seconds)

    # -- delivery ------------------------------------------------------------------------

    def cartrack_response(self, status: str, seconds: float) -> None:
        # Once per event sent: the labelled child is looked up once per status (a
        # labels() call costs more than the increment itself). Statuses are few.
        child = self._responses.get(status)
        if child is None:
            child = self._responses[status] = self.cartrack_responses.labels(status)
        child.inc()
        self.cartrack_seconds.observe(seconds)

    def event_sent(self) -> None:
        self.sent.inc()

    def event_failed(self, reason: str) -> None:
        self.failed.labels(reason).inc()

    def event_retried(self, reason: str) -> None:
        self.retried.labels(reason).inc()

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Gauges computed at scrape time: the outbox snapshot and the forwarder's pause."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        paused = GaugeMetricFamily(
            "relay_forwarder_paused", "1 while Cartrack refuses the API key (401/403)."
        )
        paused.add_metric([], 1.0 if self._metrics.paused() else 0.0)
        yield paused
        snapshot = self._metrics.outbox
        if snapshot is None:
            # Unreadable this scrape: absent, not stale, so alerts on absence can fire.
            return
        positions = GaugeMetricFamily(
            "relay_outbox_positions", "Outbox rows by status.", labels=["status"]
        )
        for status in STATUSES:
            positions.add_metric([status], snapshot.counts.get(status, 0))
        yield positions
        oldest = GaugeMetricFamily(
            "relay_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending position (0 when none is pending).",
        )
        oldest.add_metric([], snapshot.oldest_pending_age or 0.0)
        yield oldest
