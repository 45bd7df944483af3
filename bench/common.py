"""Shared pieces of the benchmarks: the machine, the fleet, the relay and stand-in processes.

Every bench drives the real relay (``python -m relay serve`` in its own process, real
HTTP over 127.0.0.1) and measures its physical ceiling in the same run, so the ratio
holds even when the shared machine's absolute speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relay.mapping import build_event, parse_batch, provider_event_id
from relay.outbox.schema import connect
from relay.timeutil import format_ms

TOKEN = "bench-token-0000-0000"
API_KEY = "bench-api-key-0123456789"
PROVIDER = "frotcom"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

INSERT_SQL = (
    "INSERT OR IGNORE INTO positions (provider_event_id, vehicle_id, event_ts,"
    " event_type, status, next_attempt_at, received_at, updated_at, payload, source)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def add_comparison_options(p: argparse.ArgumentParser, rounds: int) -> None:
    """Options of the benches that hold the relay against a ceiling run beside it."""
    p.add_argument("--event-loops", nargs="+", default=["asyncio", "uvloop"])
    p.add_argument(
        "--rounds",
        type=int,
        default=1 if QUICK else rounds,
        help="interleaved rounds of ceiling and relay runs; the table gives medians",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")


def progress(message: str) -> None:
    """Progress goes to stderr so stdout keeps only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "load": loadavg(),
    }


def print_header(title: str) -> None:
    m = machine()
    print(f"== {title}")
    print(
        f"machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, SQLite {m['sqlite']};"
        f" load average {m['load']}; quick={QUICK}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so bench/README.md can take it as printed."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- the fleet ----------------------------------------------------------------------------


def vehicle_id(n: int) -> str:
    return str(1_000_000 + n)


def vin(n: int) -> str:
    return f"BENCH{n:012d}"  # 17 characters of the VIN alphabet


def fleet(size: int) -> dict[str, str]:
    return {vehicle_id(n): vin(n) for n in range(size)}


def positions_body(
    batch_no: int, base_ms: int, fleet_size: int, vehicles: int = 10, per_vehicle: int = 10
) -> dict[str, Any]:
    """One Frotcom request: ``vehicles`` vehicles with ``per_vehicle`` positions each.

    Batches rotate through the fleet and move 10 s forward each, so every position has
    a new provider_event_id and each vehicle's positions arrive in time order.
    """
    messages = []
    for j in range(vehicles):
        n = (batch_no * vehicles + j) % fleet_size
        t0 = base_ms + batch_no * 10_000
        messages.append(
            {
                "VehicleID": vehicle_id(n),
                "LicensePlate": f"BE-{n:05d}",
                "Positions": [
                    {
                        "Timestamp": format_ms(t0 + p * 1000),
                        "Latitude": 41.40338 + n * 1e-4 + p * 1e-5,
                        "Longitude": 2.17803 + p * 1e-5,
                        "Speed": 45.0 + p,
                        "Direction": 20.0,
                        "Ignition": True,
                    }
                    for p in range(per_vehicle)
                ],
            }
        )
    return {"PvtMessages": messages}


def per_vehicle(batch_no: int, vary: bool) -> int:
    """Positions per vehicle in batch ``batch_no``: 10, or 1-19 (mean 10) when sizes vary.

    Drawn from the batch number, so the load generator and the ceiling agree on every
    batch without talking to each other. Frotcom's batches are not all one size.
    """
    return random.Random(batch_no).randint(1, 19) if vary else 10


def outbox_rows(
    body: dict[str, Any], received_ms: int, status: str, updated_ms: int | None = None
) -> list[tuple[Any, ...]]:
    """The ``positions`` rows the relay stores for one request (its mapping, its JSON)."""
    batch = parse_batch(body, received_ms, 86_400_000)
    received = format_ms(received_ms)
    updated = received if updated_ms is None else format_ms(updated_ms)
    rows = []
    for p in sorted(batch.positions, key=lambda p: (p.vehicle_id, p.ts_ms)):
        event = build_event(p, "PERIODIC", PROVIDER, received)
        rows.append(
            (
                provider_event_id(PROVIDER, p.vehicle_id, p.ts_ms),
                p.vehicle_id,
                p.event_ts,
                "PERIODIC",
                status,
                received,
                received,
                updated,
                json.dumps(event, separators=(",", ":"), ensure_ascii=False),
                json.dumps(p.raw, separators=(",", ":")),
            )
        )
    return rows


def build_backlog(path: Path, total: int, pending: int, fleet_size: int) -> None:
    """An outbox with ``total`` rows, the newest ``pending`` of them pending, the rest sent.

    Built fast (synchronous=OFF, big transactions): building is not what is measured.
    """
    if fleet_size < 10:
        raise ValueError("a fleet of at least 10: each request carries 10 vehicles")
    conn = connect(path, create=True)
    conn.execute("PRAGMA synchronous = OFF")
    now_ms = int(time.time() * 1000)
    base_ms = now_ms - 30 * 86_400_000
    per_batch = 100
    batches = -(-total // per_batch)
    sent_batches = (total - pending) // per_batch
    conn.execute("BEGIN")
    for b in range(batches):
        status = "sent" if b < sent_batches else "pending"
        rows = outbox_rows(positions_body(b, base_ms, fleet_size), now_ms - 1000, status, now_ms)
        conn.executemany(INSERT_SQL, rows)
        if b % 200 == 199:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    conn.execute(
        "UPDATE positions SET sent_at = updated_at, attempts = 1, last_status = 200"
        " WHERE status = 'sent'"
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def pending_count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        return int(
            conn.execute(
                "SELECT count(*) FROM positions INDEXED BY positions_pending"
                " WHERE status = 'pending'"
            ).fetchone()[0]
        )
    finally:
        conn.close()


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A scratch directory on the same disk as the project (BENCH_DIR overrides)."""
    parent = os.environ.get("BENCH_DIR")
    path = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-", dir=parent))
    try:
        yield path
    finally:
        remove(path)


def remove(path: Path) -> None:
    """Delete a run's files and wait until the disk is done with the deletion.

    This disk is mounted with ``discard``: ext4 trims the freed blocks in its next
    journal commit, and every fsync waits for that commit. Deleting a run's outbox
    (830 MB after the backlog bench) stalled the next run's COMMITs for 30-1,200 ms
    (traced: off the CPU, the loop not blocked), which was the mixed bench's first
    probes' ack p99. ``os.sync()`` makes that commit happen here, between runs.
    """
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    # Runs inside one bench delete files too (SQLite removes the -wal when the last
    # connection closes), so Relay.__enter__ and the ingest ceiling sync before they
    # start as well.


# -- processes ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StandIn:
    """The lean Cartrack stand-in (bench/standin.py) in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.standin"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError("stand-in did not start")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}/api/data/ingest/telematics"

    def stats(self, times: bool = False) -> dict[str, Any]:
        import urllib.request

        query = "?times=1" if times else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats{query}", timeout=30) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class Relay:
    """``cartrack-relay serve`` in its own process, as systemd would run it."""

    def __init__(
        self,
        directory: Path,
        db: Path,
        cartrack_url: str,
        vehicles: dict[str, str],
        concurrency: int = 32,
        event_loop: str = "asyncio",
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        sections: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "shutdown_timeout_seconds": 10,
                "event_loop": event_loop,
            },
            "frotcom": {"tokens": [TOKEN]},
            "cartrack": {
                "url": cartrack_url,
                "api_key": API_KEY,
                "timeout_seconds": 10,
                "concurrency": concurrency,
            },
            "outbox": {"path": str(db)},
            "retry": {"initial_seconds": 0.5, "max_seconds": 5.0},
        }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("[vehicles]")
        lines += [f'"{k}" = "{v}"' for k, v in vehicles.items()]
        self.config = directory / "relay.toml"
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.log = directory / "relay.log"
        self.db = db
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startup_seconds = 0.0

    def start(self) -> None:
        started = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "serve",
                    "--config",
                    str(self.config),
                    "--log-format",
                    "json",
                ],
                cwd=self.config.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = started + START_TIMEOUT
        while time.monotonic() < deadline:
            event = self.event("relay_started")
            if event is not None:
                self.startup_seconds = time.monotonic() - started
                self.port = int(event["listen"][0].rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.005)
        raise RuntimeError("relay did not start in time")

    def event(self, name: str) -> dict[str, Any] | None:
        with self.log.open("rb") as f:
            for line in f:
                if name.encode() in line and line.endswith(b"\n"):
                    parsed: dict[str, Any] = json.loads(line)
                    if parsed.get("event") == name:
                        return parsed
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/frotcom"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def __enter__(self) -> Relay:
        os.sync()  # what earlier runs wrote or deleted is settled before this one starts
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loadgen_args(
    url: str,
    senders: int,
    batches: int,
    base_ms: int,
    duration: float,
    fleet_size: int | None = None,
    rate: float | None = None,
    vary: bool = False,
) -> list[str]:
    """The arguments of a ``bench.loadgen`` run, for ``sys.executable``."""
    args = ["-m", "bench.loadgen", "--url", url, "--senders", str(senders)]
    args += ["--batches", str(batches), "--base-ms", str(base_ms), "--duration", str(duration)]
    if fleet_size is not None:
        args += ["--fleet", str(fleet_size)]
    if rate is not None:
        args += ["--rate", str(rate)]
    if vary:
        args.append("--vary")
    return args


def run_json(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a helper process (a load generator) and parse the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed: {out.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result
