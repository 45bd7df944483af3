"""Smoke runs of bench/ at tiny sizes: each bench still runs end to end and prints its figures.

No timing is asserted (speed is what `make bench` measures, on a quiet machine); these
only keep the scripts from rotting as the relay changes underneath them.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from bench import backlog, common, findings, forward, ingest, mixed

pytestmark = pytest.mark.slow

NUMBER = r"[0-9][0-9,]*(\.[0-9]+)?"


def row(out: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{out}")


def is_number(cell: str) -> bool:
    return re.fullmatch(NUMBER, cell) is not None


def test_ingest_prints_relay_and_ceiling(capsys: pytest.CaptureFixture[str]) -> None:
    assert ingest.main(["--batches", "4", "--senders", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    ceiling = row(out, "sqlite3 batch 100, FULL (ceiling)")
    assert is_number(ceiling[0])
    assert ceiling[-1] == "1.00"
    for loop in ("asyncio", "uvloop"):  # uvloop: server.event_loop, end to end
        relay = row(out, f"relay, 2 senders, {loop}")
        assert all(is_number(c) for c in relay), relay  # rate, p50, p99, CPU, ratio
    # Where the gap goes: the storage path without HTTP, alone and beside the loop.
    alone = row(out, "relay storage path alone, groups of 4, no HTTP")
    assert [is_number(c) for c in alone] == [True, False, False, True, True], alone
    beside = row(out, "relay storage path beside the loop, 2 tasks, no HTTP")
    assert all(is_number(c) for c in beside), beside
    assert "errors: 0" in out


def test_ingest_with_batches_of_varying_size(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--batches", "4", "--senders", "2", "--rounds", "1", "--event-loops", "asyncio"]
    assert ingest.main([*args, "--vary"]) == 0
    out = capsys.readouterr().out
    assert "requests of 10-190 (mean 100) positions" in out
    assert all(is_number(c) for c in row(out, "relay, 2 senders, asyncio"))
    assert "errors: 0" in out
    # Sizes come from the batch number alone (the load generator and the ceiling each
    # draw them), 1-19 positions per vehicle, 100 per batch on average.
    sizes = [common.per_vehicle(b, vary=True) for b in range(1000)]
    assert (min(sizes), max(sizes)) == (1, 19)
    assert 9.5 < sum(sizes) / len(sizes) < 10.5
    assert {common.per_vehicle(b, vary=False) for b in range(10)} == {10}


def test_forward_drains_the_backlog_and_prints_the_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert forward.main(["--events", "200", "--concurrency", "4"]) == 0
    out = capsys.readouterr().out
    assert is_number(row(out, "bare aiohttp client, concurrency 4 (ceiling)")[0])
    lean = row(out, "bare http1 client, concurrency 4 (relay's transport)")
    assert all(is_number(c) for c in lean), lean
    relay = row(out, "relay, concurrency 4, asyncio")
    assert all(is_number(c) for c in relay), relay  # rate, CPU, x ceiling, x bare http1


def test_backlog_prints_every_cost_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert backlog.main(["--rows", "2000", "--concurrency", "4"]) == 0
    out = capsys.readouterr().out
    cells = row(out, "2,000")
    assert cells[0] == "200"  # pending
    assert all(is_number(c) for c in cells), cells


def test_mixed_prints_the_sustained_load(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--start", "200", "--max-probes", "1", "--probe-seconds", "1", "--duration", "1"]
    assert mixed.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(rf"highest steady load: {NUMBER} positions/s", out), out
    assert re.search(rf"relay CPU {NUMBER} ms per 1,000 positions", out), out


def test_backlog_builder_makes_the_requested_outbox(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    common.build_backlog(db, 300, 100, fleet_size=20)
    conn = sqlite3.connect(db)
    try:
        counts = dict(conn.execute("SELECT status, count(*) FROM positions GROUP BY status"))
        (vehicles,) = conn.execute("SELECT count(DISTINCT vehicle_id) FROM positions").fetchone()
    finally:
        conn.close()
    assert counts == {"pending": 100, "sent": 200}
    assert vehicles == 20
    assert common.pending_count(db) == 100


def test_findings_print_both_forms_of_each(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--rows", "500", "--requests", "3", "--backlog", "500", "--repeats", "1"]
    argv += ["--seconds", "1"]
    assert findings.main(argv) == 0
    out = capsys.readouterr().out
    for label in (
        "CHECK status IN (...) vs OR",
        "unique keys: random vs time-ordered",
        "loop 80% busy: thread per-row vs loop multi-row",
        "loop 95% busy: thread per-row vs loop multi-row",
        "oldest row per vehicle, 500 pending",
    ):
        cells = row(out, label)
        assert all(is_number(c) for c in cells[1:]), cells
