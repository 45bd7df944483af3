"""Profile the relay under a bench's load with py-spy (``pip install py-spy``; not a dependency).

``python -m bench.profile ingest`` (or ``forward``) starts ``serve``, drives it as the
bench does, samples the relay process with ``py-spy record`` and prints the functions
with the most samples, inclusive and self. The collapsed stacks stay in the given
``--out`` file for a flame graph (e.g. speedscope).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import (
    ROOT,
    Relay,
    StandIn,
    build_backlog,
    fleet,
    loadgen_args,
    progress,
    workdir,
)


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# First match from the leaf up decides a sample's category.
CATEGORIES = (
    (
        "SQLite statements",
        (
            "_insert_rows",
            "run_group",
            "_load_states",
            "mark_sent",
            "_run_job",
            "next_rows",
            "pending_vehicles",
            "_update",
        ),
    ),
    ("event types in the transaction", ("store_batch.<locals>.work",)),
    ("JSON for the outbox/Cartrack", ("_dumps", "with_vin", "fingerprint")),
    ("decode + validate the batch", ("decode_body", "parse_batch")),
    ("build events, timestamps", ("build_event", "format_ms", "parse_instant", "batch.py")),
    ("logging", ("structlog",)),
    ("metrics", ("metrics.py", "prometheus")),
    ("forwarder lanes + client logic", ("forwarder.py", "cartrack.py")),
    ("aiohttp + asyncio", ("aiohttp", "asyncio", "selectors")),
)


def category(frames: list[str]) -> str:
    if any("_bootstrap" in f for f in frames[:3]):
        return "threads (the writer: statements, BEGIN/COMMIT/fsync)"
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarise(out: Path, top: int) -> None:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
        kinds[category(frames)] += n
    print(f"{total} samples")
    print("-- by category")
    for kind, n in kinds.most_common():
        print(f"{100 * n / total:5.1f}%  {kind}")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:5.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("bench", choices=["ingest", "forward"])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("profile.txt"))
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    out = args.out.resolve()
    with workdir("profile") as directory, StandIn() as standin:
        db = directory / "outbox.sqlite3"
        if args.bench == "forward":
            progress("building a backlog of 100,000 events")
            build_backlog(db, 100_000, 100_000, 500)
            relay = Relay(directory, db, standin.url, fleet(500), concurrency=args.concurrency)
        else:
            relay = Relay(directory, db, standin.url, vehicles={})
        with relay:
            spy = record(relay.pid, args.seconds, out)
            if args.bench == "ingest":
                subprocess.run(
                    [
                        sys.executable,
                        *loadgen_args(
                            relay.url,
                            args.senders,
                            3000,
                            int(time.time() * 1000) - 86_400_000,
                            args.seconds,
                        ),
                    ],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                )
            spy.wait(timeout=args.seconds + 60)
    summarise(out, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
