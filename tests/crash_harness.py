"""Crash harness: real ``serve`` processes killed with SIGKILL over and over on one outbox.

The product's promise is that a position answered with 200 reaches Cartrack whatever
happens in between. This module proves it the blunt way, for ``tests/test_crash.py``
(a few dozen kills) and ``make soak`` (hundreds):

- several senders post batches of unique positions (unique VehicleID + Timestamp) over
  several vehicles, and re-send a failed batch the way Frotcom does, until it gets a 200;
- a FakeCartrack in this process accepts the events;
- the relay is killed with SIGKILL in five kinds of moment, each round of five kills
  visiting every kind in a seeded random order: right after the n-th acknowledgement
  (``ingest``, other batches are mid-commit then), right after the n-th event reached
  Cartrack but before the relay read the answer (``delivery``), at a random offset
  after spawn (``startup``: opening, migrating, the first deliveries of the backlog),
  at a random offset once serving (``random``), and shortly after a SIGTERM, as
  systemd does when a stop overruns (``stopping``: draining, the last acks' flush);
- after every kill, while the process is dead: ``PRAGMA integrity_check`` is ``ok`` and
  every acknowledged position is a row of the outbox;
- at the end the relay runs until the outbox drains and stops with SIGTERM.

The oracle: nothing acknowledged is lost, nothing arrives that was never sent, no row
is left pending, every request Cartrack saw was valid, a row recorded ``sent`` is never
offered again, and duplicates (an event delivered again after a kill) stay within the
window the kills opened: events Cartrack had accepted whose rows were not yet recorded
``sent`` when the process died.

Run it by hand: ``python tests/crash_harness.py --kills 200 --seed 7`` (``make soak``);
the seed and the number of kills also come from ``RELAY_CRASH_SEED`` and
``RELAY_CRASH_KILLS``. A seed fixes the kill schedule, the kill points and the batches;
the interleaving with the operating system's scheduling is not replayable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import API_KEY, TOKEN, wait_until
from crash_load import (
    CONCURRENCY,
    STEP_TIMEOUT,
    VEHICLES,
    Senders,
    TrackingCartrack,
    read_outbox,
)
from proc import RelayProcess

SEED_ENV = "RELAY_CRASH_SEED"
KILLS_ENV = "RELAY_CRASH_KILLS"
WINDOWS = ("ingest", "delivery", "startup", "random", "stopping")
# Short runs ingest faster than they deliver, so the backlog grows with the kills: the
# final drain gets a base allowance plus time for the backlog at a very modest rate.
DRAIN_TIMEOUT = 60.0
DRAIN_MIN_RATE = 50  # events per second


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass
class Figures:
    seed: int
    kills: int = 0
    windows: Counter[str] = field(default_factory=Counter)
    attempted: int = 0
    acknowledged: int = 0
    delivered: int = 0
    lost: int = 0
    phantom: int = 0
    duplicates: int = 0
    redelivery_window: int = 0  # sum over kills of accepted-but-not-yet-sent events
    max_window: int = 0
    integrity_ok: int = 0
    integrity_checks: int = 0
    clean_stops: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    cartrack_statuses: Counter[int] = field(default_factory=Counter)
    final_statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        windows = ", ".join(f"{w} {self.windows[w]}" for w in WINDOWS)
        return "\n".join(
            [
                f"crash harness  seed={self.seed}  ({SEED_ENV}={self.seed} replays the schedule)",
                f"kills survived      {self.kills}  ({windows};"
                f" {self.clean_stops} stops finished before their SIGKILL)",
                f"positions sent      {self.attempted}",
                f"acknowledged (200)  {self.acknowledged}",
                f"delivered           {self.delivered}",
                f"lost                {self.lost}",
                f"never sent, arrived {self.phantom}",
                f"duplicates          {self.duplicates}  (window opened by kills:"
                f" {self.redelivery_window}, largest {self.max_window})",
                f"integrity checks ok {self.integrity_ok}/{self.integrity_checks}",
                f"final outbox        {dict(self.final_statuses)}",
                f"webhook outcomes    {dict(sorted(self.outcomes.items()))}",
                f"cartrack answers    {dict(sorted(self.cartrack_statuses.items()))}",
                f"duration            {self.seconds:.1f} s",
                "RESULT: "
                + ("PASS" if not self.problems else "FAIL\n  " + "\n  ".join(self.problems)),
            ]
        )


class CrashHarness:
    def __init__(
        self,
        directory: Path,
        seed: int,
        kills: int,
        progress: Callable[[Figures, int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.progress = progress
        self.rng = random.Random(seed)
        self.kills = kills
        self.figures = Figures(seed=seed)
        self.cartrack = TrackingCartrack()
        self.senders = Senders(random.Random(self.rng.random()))
        self.relay: RelayProcess | None = None
        self.startup_seconds = 1.0  # refined by every start
        # Between runs: what the outbox said when the last process died, and what
        # Cartrack had accepted then without the row being recorded sent.
        self.dead_statuses: dict[str, str] = {}
        self.sent_before: set[str] = set()
        self.unrecorded: set[str] = set()
        self.run_start = 0  # index into cartrack.requests where the current run began
        self.reported_missing: set[str] = set()

    async def run(self) -> Figures:
        began = time.monotonic()
        await self.cartrack.start()
        assert self.cartrack.url is not None
        self.relay = RelayProcess(
            self.directory,
            self.cartrack.url,
            vehicles=VEHICLES,
            cartrack={"concurrency": CONCURRENCY},
        )
        try:
            self.senders.start()
            for window in self.schedule():
                await self.kill_once(window)
            await self.finish()
        finally:
            self.relay.close()
            await self.senders.stop()
            await self.cartrack.stop()
            self.figures.seconds = time.monotonic() - began
        return self.figures

    def schedule(self) -> list[str]:
        """Every window once per round, in a seeded random order."""
        order: list[str] = []
        while len(order) < self.kills:
            block = list(WINDOWS)
            self.rng.shuffle(block)
            order.extend(block)
        if order and order[0] == "startup":  # the first start must create the outbox
            order[0], order[1 % len(order)] = order[1 % len(order)], order[0]
        return order[: self.kills]

    async def start(self) -> None:
        assert self.relay is not None
        await self.close_run()
        spawned = time.monotonic()
        await self.relay.start(timeout=STEP_TIMEOUT)
        self.startup_seconds = time.monotonic() - spawned
        self.senders.serving(self.relay.url)

    async def kill_once(self, window: str) -> None:
        relay = self.relay
        assert relay is not None
        if window == "startup":
            await self.close_run()
            relay.spawn()
            # A random moment of the start: opening, migrating, the backlog's first sends.
            await asyncio.sleep(self.rng.uniform(0, 1.2 * self.startup_seconds))
            relay.kill()
        else:
            await self.start()

            def kill() -> None:
                self.senders.down()
                relay.kill()

            if window == "random":
                await asyncio.sleep(self.rng.uniform(0, 0.5))
                kill()
            elif window == "stopping":
                # systemd's SIGKILL when a stop overruns: mid-drain, mid-final-flush.
                self.senders.on_ack.arm(self.rng.randint(1, 10), lambda: None)
                await asyncio.wait_for(self.senders.on_ack.fired.wait(), STEP_TIMEOUT)
                relay.send_signal(signal.SIGTERM)
                await asyncio.sleep(self.rng.uniform(0, 0.1))
                kill()
            else:
                trigger = self.senders.on_ack if window == "ingest" else self.cartrack.on_delivery
                trigger.arm(self.rng.randint(1, 30), kill)
                await asyncio.wait_for(trigger.fired.wait(), STEP_TIMEOUT)
        self.senders.down()
        code = await relay.wait(timeout=STEP_TIMEOUT)
        if code == 0 and window == "stopping":
            self.figures.clean_stops += 1  # the stop won the race against the SIGKILL
        elif code != -signal.SIGKILL:
            raise AssertionError(
                f"kill {self.figures.kills + 1} ({window}): relay exited {code} on its own;"
                f" stderr: {relay.stderr()[-2000:]!r}"
            )
        self.figures.kills += 1
        self.figures.windows[window] += 1
        self.check_dead_outbox(f"kill {self.figures.kills} ({window})")
        if self.progress is not None:
            self.progress(self.figures, len(self.senders.acked))

    def check_dead_outbox(self, when: str) -> dict[str, str]:
        """While no process holds the file: it is sound and holds every acknowledged row."""
        assert self.relay is not None
        if not self.relay.db_path.exists():
            return {}  # killed before the first start created it: nothing was acknowledged
        figures = self.figures
        figures.integrity_checks += 1
        integrity, statuses = read_outbox(self.relay.db_path)
        if integrity == "ok":
            figures.integrity_ok += 1
        else:
            figures.problems.append(f"{when}: integrity_check: {integrity[:500]}")
        # Reported once, at the first check that misses them.
        missing = self.senders.acked - statuses.keys() - self.reported_missing
        self.reported_missing |= missing
        if missing:
            figures.problems.append(
                f"{when}: {len(missing)} acknowledged positions not in the outbox,"
                f" e.g. {sorted(missing)[:3]}"
            )
        self.dead_statuses = statuses
        return statuses

    async def close_run(self) -> None:
        """Before the next process starts: account for the redeliveries of the last run.

        An event may come back (a 409) only if the kill before that run caught it in
        the window: accepted by Cartrack, its row not yet recorded ``sent``. Rows
        recorded ``sent`` are never offered again.
        """
        run = self.relay.runs if self.relay is not None else 0
        if run == 0:
            return
        # The dead process's last bytes may still be in the fake's socket: let them land
        # before drawing the line between its requests and the next process's.
        await wait_until(self.cartrack.idle, STEP_TIMEOUT)
        requests = self.cartrack.requests
        again = {
            r.event["source"]["provider_event_id"]
            for r in requests[self.run_start :]
            if r.status == 409 and isinstance(r.event, dict)
        }
        self.run_start = len(requests)
        resent = again & self.sent_before
        if resent:
            self.figures.problems.append(
                f"run {run}: {len(resent)} events recorded sent before it started were"
                f" delivered again, e.g. {sorted(resent)[:3]}"
            )
        elif again - self.unrecorded:
            self.figures.problems.append(
                f"run {run}: {len(again - self.unrecorded)} events were delivered twice"
                f" within the run, e.g. {sorted(again - self.unrecorded)[:3]}"
            )
        statuses = self.dead_statuses
        self.sent_before = {i for i, status in statuses.items() if status == "sent"}
        self.unrecorded = set(self.cartrack.ids()) - self.sent_before
        self.figures.redelivery_window += len(self.unrecorded)
        self.figures.max_window = max(self.figures.max_window, len(self.unrecorded))

    async def finish(self) -> None:
        """Last start: stop the senders, let the outbox drain, stop with SIGTERM."""
        relay = self.relay
        assert relay is not None
        await self.start()
        await self.senders.stop()
        acked = self.senders.acked
        backlog = len(self.senders.attempted) - len(self.cartrack.ids())
        timeout = DRAIN_TIMEOUT + backlog / DRAIN_MIN_RATE

        def drained() -> bool:
            if not acked <= set(self.cartrack.ids()):
                return False
            conn = sqlite3.connect(f"file:{relay.db_path}?mode=ro", uri=True, timeout=10)
            try:
                (left,) = conn.execute(
                    "SELECT count(*) FROM positions WHERE status <> 'sent'"
                ).fetchone()
            finally:
                conn.close()
            return left == 0

        try:
            await wait_until(drained, timeout)
        except TimeoutError:
            self.figures.problems.append(f"the outbox did not drain within {timeout:g}s")
        relay.send_signal(signal.SIGTERM)
        code = await relay.wait(timeout=STEP_TIMEOUT)
        if code != 0:
            self.figures.problems.append(f"final SIGTERM: exit {code}")
        statuses = self.check_dead_outbox("after the final stop")
        await self.close_run()
        self.check_output()
        self.tally(statuses)

    def check_output(self) -> None:
        """No run logged an error or wrote to stderr, and no secret reached the output.

        A SIGKILL leaves no trace of its own; an error here is the relay noticing
        something wrong with what the previous kill left behind.
        """
        relay = self.relay
        assert relay is not None
        output = relay.all_output()
        if API_KEY in output or TOKEN in output:
            self.figures.problems.append("a secret reached the relay's output")
        errors = Counter(
            f"{event['event']} (run {run})"
            for run in range(1, relay.runs + 1)
            for event in relay.events(run=run)
            if event.get("level") in ("error", "critical")
        )
        if errors:
            self.figures.problems.append(f"the relay logged errors: {dict(errors)}")
        noisy = [path.name for path in relay.stderr_paths if path.read_text().strip()]
        if noisy:
            self.figures.problems.append(f"the relay wrote to stderr: {noisy[:5]}")

    def tally(self, statuses: dict[str, str]) -> None:
        figures, senders = self.figures, self.senders
        delivered = set(self.cartrack.ids())
        figures.attempted = len(senders.attempted)
        figures.acknowledged = len(senders.acked)
        figures.delivered = len(delivered)
        figures.lost = len(senders.acked - delivered)
        figures.phantom = len(delivered - senders.attempted)
        figures.duplicates = self.cartrack.duplicates
        figures.outcomes = senders.outcomes
        figures.cartrack_statuses = self.cartrack.stats
        figures.final_statuses = Counter(statuses.values())
        problems = figures.problems
        if figures.lost:
            problems.append(f"{figures.lost} acknowledged positions never reached Cartrack")
        if figures.phantom:
            problems.append(f"{figures.phantom} events reached Cartrack that were never sent")
        if set(figures.final_statuses) - {"sent"}:
            problems.append(f"rows left undelivered: {dict(figures.final_statuses)}")
        if set(figures.cartrack_statuses) - {202, 409}:
            problems.append(f"Cartrack answered {dict(figures.cartrack_statuses)}")
        if figures.duplicates > figures.redelivery_window:
            problems.append(
                f"{figures.duplicates} duplicates, more than the {figures.redelivery_window}"
                " events accepted but not yet recorded sent at the kills"
            )
        if figures.acknowledged == 0 or figures.integrity_checks != figures.kills + 1:
            problems.append("the run proved nothing: no acknowledgement, or a kill unchecked")


async def run_crash(
    directory: Path,
    seed: int,
    kills: int,
    progress: Callable[[Figures, int], None] | None = None,
) -> Figures:
    return await CrashHarness(directory, seed, kills, progress).run()


def print_progress(figures: Figures, acknowledged: int, every: int = 25) -> None:
    if figures.kills % every == 0:
        print(
            f"  {figures.kills} kills, {acknowledged} positions acknowledged,"
            f" integrity ok {figures.integrity_ok}/{figures.integrity_checks},"
            f" problems {len(figures.problems)}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=env_int(KILLS_ENV, 200))
    parser.add_argument("--seed", type=int, default=env_int(SEED_ENV, random.randrange(2**32)))
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    print(f"crash harness: seed={args.seed} kills={args.kills}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    try:
        figures = asyncio.run(run_crash(tmp, args.seed, args.kills, print_progress))
    except Exception as exc:
        print(f"crash harness: seed={args.seed}: FAILED: {exc!r} (files kept in {tmp})")
        return 1
    if figures.problems or args.keep:
        print(f"working directory kept: {tmp}")
    else:
        shutil.rmtree(tmp)
    print(figures.summary(), flush=True)
    return 1 if figures.problems else 0


if __name__ == "__main__":
    sys.exit(main())
