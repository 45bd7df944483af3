"""Summarise runs of identical log lines instead of repeating them into journald.

A Cartrack outage fails every pending row with the same status and body: one line per
row would bury everything else in the journal. ``RepeatSummariser`` lets the first line
of a kind through, counts the repeats for ``window`` seconds, then hands back one
summary (how many, first and last time, an example). It only decides; ``RepeatLog``
does the logging, so the decisions can be tested with a fake clock and no logger.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.timeutil import Clock, format_ms, system_clock

WINDOW_SECONDS = 60.0
# Distinct kinds tracked at once; beyond it lines are logged unsummarised rather than
# letting a stream of unique errors grow this without bound.
MAX_KINDS = 1000


@dataclass(slots=True)
class _Run:
    started: float
    count: int = 0  # repeats suppressed since ``started``
    first: float = 0.0
    last: float = 0.0
    example: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Summary:
    key: Hashable
    count: int
    first: float
    last: float
    example: dict[str, Any]


class RepeatSummariser:
    def __init__(
        self,
        window: float = WINDOW_SECONDS,
        clock: Clock = system_clock,
        max_kinds: int = MAX_KINDS,
    ) -> None:
        self.window = window
        self.clock = clock
        self.max_kinds = max_kinds
        self._runs: dict[Hashable, _Run] = {}
        self._ready: list[Summary] = []

    def admit(self, key: Hashable, fields: Mapping[str, Any]) -> bool:
        """Record one occurrence; True when it should be logged in full."""
        now = self.clock()
        run = self._runs.get(key)
        if run is not None and now - run.started >= self.window:
            self._close(key, run)
            run = None
        if run is None:
            if len(self._runs) < self.max_kinds:
                self._runs[key] = _Run(started=now)
            return True
        if run.count == 0:
            run.first = now
            run.example = dict(fields)
        run.count += 1
        run.last = now
        return False

    def due(self, force: bool = False) -> list[Summary]:
        """Summaries of runs whose window has ended (every run when ``force``), oldest first."""
        now = self.clock()
        for key, run in list(self._runs.items()):
            if force or now - run.started >= self.window:
                self._close(key, run)
        ready, self._ready = self._ready, []
        return ready

    def _close(self, key: Hashable, run: _Run) -> None:
        del self._runs[key]
        if run.count:
            self._ready.append(Summary(key, run.count, run.first, run.last, run.example))


class RepeatLog:
    """Logs through a RepeatSummariser: first line in full, then ``summary_event`` lines.

    A summary names the event it stands for (``summarised``), repeats the fields that
    made the lines identical, and carries the other fields of the first suppressed line
    as ``example``; it is logged at the level of the lines it replaces.
    """

    def __init__(self, logger: Any, summary_event: str, summariser: RepeatSummariser) -> None:
        self.logger = logger
        self.summary_event = summary_event
        self.summariser = summariser

    def log(self, level: str, event: str, same: tuple[str, ...], **fields: Any) -> None:
        """Log ``event`` unless one with equal ``same`` fields was logged in this window."""
        key = (level, event, tuple((name, fields.get(name)) for name in same))
        admitted = self.summariser.admit(key, fields)
        # A run that just ended is summarised before the next run's first line.
        self.flush()
        if admitted:
            getattr(self.logger, level)(event, **fields)

    def flush(self, force: bool = False) -> None:
        for summary in self.summariser.due(force):
            level, event, same = summary.key  # type: ignore[misc]
            kept = dict(same)
            getattr(self.logger, level)(
                self.summary_event,
                summarised=event,
                **kept,
                count=summary.count,
                first=format_ms(int(summary.first * 1000)),
                last=format_ms(int(summary.last * 1000)),
                window_seconds=self.summariser.window,
                example={k: v for k, v in summary.example.items() if k not in kept},
            )
