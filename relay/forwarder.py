"""The forwarder: delivers pending outbox rows to Cartrack, one event per request.

Design:
- One *lane* (a task) per vehicle with pending rows. A lane walks its vehicle's rows in
  timestamp order and never has more than one request in flight, and it retries the
  head row until that row is sent or dead-lettered: events of one vehicle reach
  Cartrack in order. Lanes exist only while a vehicle has work.
- A semaphore bounds requests in flight across lanes (``cartrack.concurrency``). A lane
  keeps its slot for up to a batch of rows while Cartrack accepts them (``_Slot``), so
  a backlog goes out a vehicle's run of rows at a time: their acks share pages.
- Delivered rows are acknowledged to the outbox in batches by one flusher task
  (relay.acks); a crash between delivery and flush re-sends those events, which
  Cartrack absorbs by ``provider_event_id``. Retries and dead-letters are written at
  once.
- 401/403 pause every lane; one probe at a time, on the backoff schedule, until Cartrack
  accepts our key again.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from relay.acks import Acks
from relay.cartrack import CartrackClient, Outcome, Verdict, backoff_delay, retry_delay
from relay.config import RetryConfig
from relay.mapping import with_vin
from relay.metrics import RelayMetrics
from relay.outbox.storage import Outbox, OutboxRow
from relay.repeats import RepeatLog, RepeatSummariser
from relay.timeutil import Clock, format_ms, parse_instant, sleep_unless, system_clock

log = structlog.get_logger("relay.forwarder")

# Rows a lane reads at once: every lane holds its batch while it waits for a request
# slot, so this times the number of vehicles with a backlog bounds the memory.
LANE_BATCH = 20
RESCAN_SECONDS = 5.0
# relay_state's key while sending is paused (`status` lists relay_state).
PAUSED_KEY = "forwarder_paused"
# Timers may fire a hair early: re-check, but boundedly (a frozen test clock must not spin).
_DUE_CHECKS = 3


@dataclass
class PauseState:  # set while Cartrack refuses our key (401/403)
    since: float
    probes: int
    probe_at: float
    status: int | None
    recorded: bool = False  # written to relay_state (PAUSED_KEY)


class _Slot:
    """A lane's hold on one of the request slots, kept across its consecutive sends.

    A lane keeps its slot for the rest of its batch (LANE_BATCH rows) while Cartrack
    accepts each row, and gives it back before any wait (backoff, a row not yet due,
    pause) and at the end of the batch. Measured: the acks of a burst of one vehicle's
    rows fall on a few table and index pages, so marking them sent costs ~8 us of
    SQLite per row instead of ~38 when every lane takes turns one request at a time.
    """

    __slots__ = ("_slots", "held")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self.held = False

    async def acquire(self) -> None:
        if not self.held:
            await self._slots.acquire()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()


class _Done(enum.Enum):
    DELIVERED = "delivered"  # sent or dead-lettered: the lane moves on
    STOPPING = "stopping"
    UNMAPPED = "unmapped"  # the vehicle left the map: its rows are held


class Forwarder:
    def __init__(
        self,
        outbox: Outbox,
        client: CartrackClient,
        vehicles: Mapping[str, str],
        retry: RetryConfig,
        concurrency: int,
        clock: Clock = system_clock,
        rand: Callable[[], float] = random.random,
        rescan_seconds: float = RESCAN_SECONDS,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.vehicles = vehicles
        self.retry = retry
        self.clock = clock
        self.rand = rand
        self.rescan_seconds = rescan_seconds
        self.stats: Counter[str] = Counter()
        self.metrics = metrics if metrics is not None else RelayMetrics()
        # An outage fails every row alike: first line in full, then a periodic summary
        # (flushed by the app's summary task and at stop).
        self.failures = RepeatLog(log, "delivery_failures_summary", RepeatSummariser(clock=clock))
        self.pause: PauseState | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._probe_lock = asyncio.Lock()
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.acks = Acks(outbox, self._stopping, self.stats, self.failures, retry.initial_seconds)
        self._fatal: BaseException | None = None

    # -- control -------------------------------------------------------------------------

    def notify(self, vehicle_ids: Iterable[str]) -> None:
        """New pending rows were committed for these vehicles."""
        self._dirty.update(vehicle_ids)
        self._wake.set()

    def set_vehicles(self, vehicles: Mapping[str, str]) -> None:
        self.vehicles = vehicles

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    async def run(self) -> None:
        """Dispatch lanes until stopped; raises if a lane or the flusher hits a bug."""
        loop = asyncio.get_running_loop()
        flusher = asyncio.create_task(self.acks.run(), name="forwarder-flusher")
        flusher.add_done_callback(lambda _: self._wake.set())
        try:
            # A pause recorded by a run that died paused; this run finds out afresh.
            # Only a note for `status`: a locked outbox must not stop the forwarder.
            try:
                await self.outbox.clear_state(PAUSED_KEY)
            except sqlite3.OperationalError as exc:
                log.warning("relay_state_not_cleared", key=PAUSED_KEY, error=str(exc))
            self._dirty.update(await self.outbox.pending_vehicles())
            next_rescan = loop.time() + self.rescan_seconds
            while not self._stopping.is_set():
                if self._fatal is not None:
                    raise self._fatal
                if flusher.done():
                    flusher.result()
                    raise RuntimeError("ack flusher stopped")
                if loop.time() >= next_rescan:
                    # Catches rows changed behind our back (`requeue` from the CLI) and
                    # restarts lanes that died of a storage error.
                    try:
                        self._dirty.update(await self.outbox.pending_vehicles())
                    except sqlite3.OperationalError as exc:
                        self.stats["storage_errors"] += 1
                        log.error("rescan_failed", error=str(exc))
                    next_rescan = loop.time() + self.rescan_seconds
                for vehicle_id in list(self._dirty):
                    if vehicle_id not in self._lanes:
                        self._start_lane(vehicle_id)
                self._wake.clear()
                await sleep_unless(self._wake, max(0.0, next_rescan - loop.time()))
        finally:
            await self._drain(flusher)

    async def stop(self) -> None:
        self._stopping.set()
        self.acks.hurry()
        self._wake.set()

    async def flush_acks(self) -> None:
        """Record delivered rows as sent now (before their vehicle's rows are held)."""
        await self.acks.flush()

    async def _drain(self, flusher: asyncio.Task[None]) -> None:
        self._stopping.set()
        self.acks.hurry()
        try:
            lanes = list(self._lanes.values())
            if lanes:
                # Lanes exit at their next wait; an in-flight request is allowed to finish
                # (bounded by cartrack.timeout_seconds). The caller bounds the whole stop.
                await asyncio.gather(*lanes, return_exceptions=True)
        finally:
            # Also when the caller's bound cancels us: what Cartrack already accepted is
            # recorded before the outbox closes, instead of being sent again next start.
            lanes = list(self._lanes.values())
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            self.acks.wake()
            await asyncio.gather(flusher, return_exceptions=True)
            await self.acks.flush()

    # -- lanes ---------------------------------------------------------------------------

    def _start_lane(self, vehicle_id: str) -> None:
        task = asyncio.create_task(self._lane(vehicle_id), name=f"lane-{vehicle_id}")
        self._lanes[vehicle_id] = task
        task.add_done_callback(lambda t: self._lane_done(vehicle_id, t))

    def _lane_done(self, vehicle_id: str, task: asyncio.Task[None]) -> None:
        self._lanes.pop(vehicle_id, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if vehicle_id in self._dirty:
                # Rows committed after the lane's last look: a fresh lane, now, not at rescan.
                self._wake.set()
            return
        if isinstance(exc, sqlite3.OperationalError):
            # Disk full, I/O error, lock timeout: environmental. The rows stay pending;
            # the next rescan restarts the lane.
            self.stats["storage_errors"] += 1
            log.error("lane_storage_error", vehicle_id=vehicle_id, error=str(exc))
            return
        log.critical("lane_crashed", vehicle_id=vehicle_id, exc_info=exc)
        self._fatal = exc
        self._wake.set()

    async def _lane(self, vehicle_id: str) -> None:
        slot = _Slot(self._slots)
        try:
            await self._lane_batches(vehicle_id, slot)
        finally:
            slot.release()

    async def _lane_batches(self, vehicle_id: str, slot: _Slot) -> None:
        delivered: list[int] = []  # this lane's rows that may still read as pending
        while not self._stopping.is_set():
            slot.release()  # the other lanes' turn: at most a batch per hold
            self._dirty.discard(vehicle_id)
            # Delivered rows whose ack is not flushed yet still read as pending: skip
            # this lane's own (only its own: other vehicles' acks cost it nothing).
            delivered = [row_id for row_id in delivered if row_id in self.acks.unacked]
            rows = await self._next_rows(vehicle_id, delivered)
            if not rows:
                if vehicle_id in self._dirty:
                    continue
                return
            for row in rows:
                done = await self._deliver(row, slot)
                if done is _Done.STOPPING:
                    return
                if done is _Done.UNMAPPED:
                    await self._hold(vehicle_id)
                    return
                delivered.append(row.id)
                if vehicle_id in self._dirty:
                    # Rows committed meanwhile may be older than the rest of this batch
                    # (Frotcom's batches overlap): read again so they go first.
                    break

    async def _next_rows(self, vehicle_id: str, delivered: list[int]) -> list[OutboxRow]:
        """Up to LANE_BATCH of the vehicle's pending rows that are not delivered already."""
        limit = LANE_BATCH
        # Passed over in SQL (cheaper than reading them); a long list (acks failing to
        # be written for a while) is left to the filter below instead.
        skip = delivered if len(delivered) <= 4 * LANE_BATCH else []
        while True:
            fetched = await self.outbox.next_rows(vehicle_id, limit, skip)
            rows = [row for row in fetched if row.id not in self.acks.unacked][:LANE_BATCH]
            if rows or len(fetched) < limit:
                return rows
            # A full read of delivered rows (an earlier lane's, not flushed yet): the
            # vehicle's undelivered rows come after them.
            limit *= 2

    async def _hold(self, vehicle_id: str) -> None:
        # Rows already delivered must end 'sent', not 'held' (then re-sent on release).
        await self.flush_acks()
        if vehicle_id in self.vehicles:
            return  # mapped again by a reload meanwhile, which also notified us
        held = await self.outbox.hold_vehicle(vehicle_id)
        log.warning("vehicle_unmapped", vehicle_id=vehicle_id, held=held)

    async def _wait_due(self, due: float) -> bool:
        """Sleep until the clock reads ``due``; False when stopping."""
        for _ in range(_DUE_CHECKS):
            delay = due - self.clock()
            if delay <= 0:
                break
            if await sleep_unless(self._stopping, delay):
                return False
        return not self._stopping.is_set()

    async def _deliver(self, row: OutboxRow, slot: _Slot) -> _Done:
        """Send one row until it is sent or dead-lettered, or the lane must stop."""
        attempts = row.attempts
        due = _due_seconds(row.next_attempt_at)
        while True:
            if due > self.clock():
                slot.release()  # nobody waits for a slot held by a sleeping lane
                if not await self._wait_due(due):
                    return _Done.STOPPING
            elif self._stopping.is_set():
                return _Done.STOPPING
            # Per attempt: a reload may drop the vehicle or fix its VIN during a backoff.
            vin = self.vehicles.get(row.vehicle_id)
            if vin is None:
                slot.release()
                return _Done.UNMAPPED
            body = with_vin(row.payload, vin)
            if slot.held and self.pause is None:
                # The lane's next row while Cartrack accepts its batch: what _send does
                # then, without a coroutine per event (the drain is CPU-bound on the loop).
                outcome = await self.client.send(body)
                if outcome.verdict is not Verdict.SENT:
                    slot.release()
                    if outcome.verdict is Verdict.AUTH:
                        self._enter_pause(outcome)
            else:
                maybe = await self._send(body, slot)
                if maybe is None:
                    return _Done.STOPPING
                outcome = maybe
            attempts += 1
            if outcome.verdict is Verdict.SENT:
                self.stats["sent"] += 1
                self.metrics.event_sent()
                self.acks.add(row.id, outcome.status)
                return _Done.DELIVERED
            if outcome.verdict is Verdict.REJECTED:
                self.stats["failed"] += 1
                self.metrics.event_failed(outcome.label)
                await self.outbox.mark_failed(row.id, outcome.status, outcome.detail)
                # The dead-letter line: delivery_failed's fields, with no next attempt.
                self._log_failure("error", "event_rejected", row, outcome, attempts, None, None)
                await self.outbox.set_state("last_error", _describe(outcome))
                return _Done.DELIVERED
            if outcome.verdict is Verdict.AUTH and self.pause is not None:
                wait = max(0.0, self.pause.probe_at - self.clock())
            else:
                wait = retry_delay(
                    attempts,
                    self.retry.initial_seconds,
                    self.retry.max_seconds,
                    outcome.retry_after,
                    self.rand,
                )
            # Rounded up: Retry-After is a minimum, never shortened by truncation.
            due_ms = math.ceil((self.clock() + wait) * 1000)
            due = due_ms / 1000
            self.stats["retried"] += 1
            self.metrics.event_retried(outcome.label)
            await self.outbox.mark_retry(row.id, format_ms(due_ms), outcome.status, outcome.detail)
            await self.outbox.set_state("last_error", _describe(outcome))
            if self.pause is not None and not self.pause.recorded:
                # `status` shows it (relay_state), since the pause began.
                self.pause.recorded = True
                await self.outbox.set_state(
                    PAUSED_KEY,
                    f"Cartrack refused the API key (HTTP {self.pause.status}): nothing is"
                    " sent; one probe at a time on the backoff schedule",
                )
            self._log_failure(
                "warning", "delivery_failed", row, outcome, attempts, format_ms(due_ms), wait
            )

    def _log_failure(
        self,
        level: str,
        event: str,
        row: OutboxRow,
        outcome: Outcome,
        attempt: int,
        next_attempt_at: str | None,
        retry_in: float | None,
    ) -> None:
        """The one line per failed attempt; repeats of the same answer are summarised."""
        self.failures.log(
            level,
            event,
            ("status", "reason", "detail"),
            row_id=row.id,
            vehicle_id=row.vehicle_id,
            event_ts=row.event_ts,
            verdict=str(outcome.verdict),
            status=outcome.status,
            reason=outcome.label,
            detail=outcome.detail[:200],
            attempt=attempt,
            next_attempt_at=next_attempt_at,
            retry_in=None if retry_in is None else round(retry_in, 3),
        )

    async def _send(self, body: bytes, slot: _Slot) -> Outcome | None:
        """One request (or one probe while paused); None when stopping before it went out.

        The lane keeps its slot only when Cartrack accepted the event.
        """
        while True:
            if self._stopping.is_set():
                slot.release()
                return None
            if self.pause is None:
                if not slot.held:
                    await slot.acquire()
                # After the wait for a slot: nothing new once stopping or paused.
                if self._stopping.is_set():
                    slot.release()
                    return None
                if self.pause is not None:
                    slot.release()
                    continue
                outcome = await self.client.send(body)
                if outcome.verdict is not Verdict.SENT:
                    slot.release()
                if outcome.verdict is Verdict.AUTH:
                    self._enter_pause(outcome)
                return outcome
            slot.release()
            # Paused: every lane queues here, and one probe goes out at a time.
            async with self._probe_lock:
                pause = self.pause
                if pause is None:
                    continue
                delay = pause.probe_at - self.clock()
                if delay > 0 and await sleep_unless(self._stopping, delay):
                    return None
                if self._stopping.is_set():
                    return None
                outcome = await self.client.send(body)
                self.stats["probes"] += 1
                # Only an answer about the event itself proves the key works; a 5xx does not.
                if outcome.verdict in (Verdict.SENT, Verdict.REJECTED):
                    log.info(
                        "forwarder_resumed",
                        reason=f"a probe was answered HTTP {outcome.status}",
                        paused_for=round(self.clock() - pause.since, 3),
                        probes=pause.probes + 1,
                    )
                    self.pause = None
                    await self.outbox.clear_state(PAUSED_KEY)
                else:
                    pause.probes += 1
                    pause.status = outcome.status
                    pause.probe_at = self.clock() + backoff_delay(
                        pause.probes + 1,
                        self.retry.initial_seconds,
                        self.retry.max_seconds,
                        self.rand,
                    )
                    log.warning(
                        "cartrack_probe_failed",
                        status=outcome.status,
                        probes=pause.probes,
                        next_probe_in=round(pause.probe_at - self.clock(), 3),
                    )
                return outcome

    def _enter_pause(self, outcome: Outcome) -> None:
        if self.pause is not None:
            return
        now = self.clock()
        delay = backoff_delay(1, self.retry.initial_seconds, self.retry.max_seconds, self.rand)
        self.pause = PauseState(since=now, probes=0, probe_at=now + delay, status=outcome.status)
        self.stats["pauses"] += 1
        log.error(
            "forwarder_paused",
            reason="cartrack refused the API key",
            status=outcome.status,
            detail=outcome.detail[:200],
        )


def _due_seconds(next_attempt_at: str) -> float:
    """Epoch seconds of a row's next_attempt_at (read for every row sent).

    The outbox writes it in its canonical form, which parse_instant reads with
    fromisoformat instead of parse_timestamp's general path (2.2 us).
    """
    return parse_instant(next_attempt_at)[0] / 1000


def _describe(outcome: Outcome) -> str:
    status = "no response" if outcome.status is None else f"HTTP {outcome.status}"
    return f"{status}: {outcome.detail[:500]}"
