"""The command line as an operator uses it: output, exit codes, and what it does to the outbox.

Most tests call ``relay.cli.main`` in-process (fast); the ones about exit codes and
stderr also run ``python -m relay`` as a real process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import VIN, VIN2, batch, position, rows, snapshot

import relay
from relay.cli import main
from relay.config import API_KEY_ENV
from relay.mapping import parse_batch
from relay.outbox import schema
from relay.outbox.storage import Outbox
from relay.timeutil import format_ms, parse_timestamp

A, B, GONE = "9876543", "1111111", "5555555"  # GONE's VIN is no longer in the config
API_KEY = "cli-test-api-key-abcdef0123456789"
TOKEN = "frotcom-token-5678-9097-8466"
DAY = 86_400.0
T0 = parse_timestamp("2023-10-25T16:00:00Z")
REPO = Path(relay.__file__).resolve().parents[1]


def write_config(
    directory: Path, vehicles: dict[str, str] | None = None, extra: str = "", keep: float = 7
) -> Path:
    vehicles = {A: VIN, B: VIN2} if vehicles is None else vehicles
    lines = "\n".join(f'"{vid}" = "{vin}"' for vid, vin in vehicles.items())
    path = directory / "config.toml"
    path.write_text(
        f'[frotcom]\ntokens = ["{TOKEN}"]\n'
        f'[cartrack]\napi_key = "{API_KEY}"\nurl = "http://127.0.0.1:9/ingest"\n{extra}\n'
        f'[outbox]\npath = "outbox.sqlite3"\nkeep_sent_days = {keep}\n'
        f"[vehicles]\n{lines}\n"
    )
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    if code:
        assert err.count("\n") == 1, err  # one line, whatever went wrong
        assert "Traceback" not in err
    return code, out, err


def run(cwd: Path, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARTRACK_RELAY")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        check=False,
    )


def statuses(db: Path) -> dict[str, str]:
    """provider_event_id suffix 'vehicle@HH:MM' -> status."""
    return {f"{r['vehicle_id']}@{r['event_ts'][11:16]}": r["status"] for r in rows(db)}


def positions(n: int) -> list[dict[str, Any]]:
    return [position(ts=format_ms(T0 + i * 60_000)) for i in range(n)]


@pytest.fixture
def seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An outbox written by the daemon's own storage code, as after some days of running.

    A@16:00 failed 422, A@16:01 failed 404, A@16:02 sent 10 days ago, A@16:03 pending;
    B@16:00 failed 422, B@16:01 and B@16:02 sent 1 day ago;
    GONE@16:00 failed 500, GONE@16:01 failed 422 (GONE has no VIN in config.toml now);
    quarantine: one row 10 days old, one 1 hour old.
    """
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    db = tmp_path / "outbox.sqlite3"
    now = time.time()
    everyone = {A: VIN, B: VIN2, GONE: "SALLAAAF4AA123456"}

    async def seed() -> None:
        outbox = await Outbox.open(db, clock=lambda: now - 10 * DAY)
        try:
            for received, body in (
                (now - 10 * DAY, batch((A, positions(4)), (B, positions(3)), (GONE, positions(2)))),
                (now - 10 * DAY, batch((A, [position(Speed=-1)]))),
                (now - 3600, batch((B, [position(Latitude=100)]))),
            ):
                ms = int(received * 1000)
                parsed = parse_batch(body, ms, 86_400_000)
                await outbox.store_batch(parsed, everyone, "frotcom", ms)
            ids = {f"{r['vehicle_id']}@{r['event_ts'][11:16]}": r["id"] for r in rows(db)}
            await outbox.mark_sent([(ids[f"{A}@16:02"], 202)])
            outbox.clock = lambda: now - DAY
            await outbox.mark_sent([(ids[f"{B}@16:01"], 202), (ids[f"{B}@16:02"], 409)])
            outbox.clock = lambda: now - 3600
            await outbox.mark_failed(ids[f"{A}@16:00"], 422, "chassis_number unknown")
            await outbox.mark_failed(ids[f"{A}@16:01"], 404, "vehicle not found")
            await outbox.mark_failed(ids[f"{B}@16:00"], 422, "bad")
            await outbox.mark_failed(ids[f"{GONE}@16:00"], 500, "boom")
            await outbox.mark_failed(ids[f"{GONE}@16:01"], 422, "bad")
            await outbox.set_state("last_error", "HTTP 422: bad")
        finally:
            await outbox.close()

    asyncio.run(seed())
    return db


SEEDED = {
    f"{A}@16:00": "failed",
    f"{A}@16:01": "failed",
    f"{A}@16:02": "sent",
    f"{A}@16:03": "pending",
    f"{B}@16:00": "failed",
    f"{B}@16:01": "sent",
    f"{B}@16:02": "sent",
    f"{GONE}@16:00": "failed",
    f"{GONE}@16:01": "failed",
}


def test_seeded_outbox_is_what_the_tests_expect(seeded: Path) -> None:
    assert statuses(seeded) == SEEDED


# -- check-config ----------------------------------------------------------------------


def test_check_config_prints_a_redacted_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    code, out, err = cli(capsys, "check-config", "--config", str(path))
    assert (code, err) == (0, "")
    first, rest = out.split("\n", 1)
    assert first == f"config ok: {path.resolve()}"
    view = json.loads(rest)
    assert view["cartrack"]["url"] == "http://127.0.0.1:9/ingest"
    assert view["vehicles"] == 2
    assert API_KEY not in out
    assert TOKEN not in out


# -- real processes: exit codes and one-line errors -----------------------------------


def _setup_corrupt(tmp_path: Path) -> None:
    write_config(tmp_path)
    (tmp_path / "outbox.sqlite3").write_bytes(b"this is not a database\x00" * 200)


PROCESS_CASES = [
    pytest.param(
        lambda d: write_config(d, extra='region = "us"'),
        ["check-config", "--config", "config.toml"],
        2,
        "config error: cartrack.region: must be one of af, as, eu",
        id="bad-region",
    ),
    pytest.param(
        lambda d: None,
        ["check-config", "--config", "nowhere.toml"],
        2,
        "config error: cannot read nowhere.toml: No such file or directory",
        id="missing-config",
    ),
    pytest.param(
        lambda d: None,
        ["status", "--bogus"],
        2,
        "cartrack-relay: error: unrecognized arguments: --bogus",
        id="usage",
    ),
    pytest.param(
        lambda d: None,
        [],
        2,
        "cartrack-relay: error: the following arguments are required: COMMAND",
        id="no-command",
    ),
    pytest.param(
        write_config,
        ["status", "--config", "config.toml"],
        3,
        "outbox error: {dir}/outbox.sqlite3: no outbox here",
        id="status-no-outbox",
    ),
    pytest.param(
        write_config,
        ["inspect", "--config", "config.toml", "--event-id", "frotcom:1:x"],
        3,
        "outbox error: {dir}/outbox.sqlite3: no outbox here",
        id="inspect-no-outbox",
    ),
    pytest.param(
        lambda d: None,
        ["inspect", "--from", "soon", "1"],
        2,
        "cartrack-relay inspect: error: argument --from: 'soon' is not an ISO-8601 time",
        id="inspect-usage",
    ),
    pytest.param(
        _setup_corrupt,
        ["status", "--config", "config.toml"],
        3,
        "outbox error: {dir}/outbox.sqlite3: not a usable outbox database",
        id="status-corrupt",
    ),
]


@pytest.mark.parametrize(("setup", "args", "code", "message"), PROCESS_CASES)
def test_errors_in_a_real_process(
    tmp_path: Path, setup: Callable[[Path], Any], args: list[str], code: int, message: str
) -> None:
    setup(tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    result = run(tmp_path, *args)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message.format(dir=tmp_path)), result.stderr
    # Nothing was created or changed by a command that failed.
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_check_config_in_a_real_process(tmp_path: Path) -> None:
    write_config(tmp_path)
    result = run(tmp_path, "check-config", "--config", "config.toml")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"config ok: {tmp_path / 'config.toml'}\n")
    assert API_KEY not in result.stdout
    assert TOKEN not in result.stdout


def test_admin_commands_run_without_the_api_key(
    seeded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The service's key is a systemd credential the operator's shell cannot read.
    config = seeded.parent / "config.toml"
    config.write_text(config.read_text().replace(f'api_key = "{API_KEY}"', ""))
    for command in (["status"], ["inspect", A], ["requeue", "--dry-run"], ["purge", "--dry-run"]):
        code, _, err = cli(capsys, *command, "--config", str(config))
        assert (command, code, err) == (command, 0, "")
    code, _, err = cli(capsys, "check-config", "--config", str(config))
    assert code == 2
    assert err.startswith("config error: cartrack.api_key: is required")


def test_status_into_a_closed_pipe_is_quiet(seeded: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed:
        result = run(seeded.parent, "status", stdout=closed)
    assert result.returncode == 141
    assert result.stderr == ""


# -- status ----------------------------------------------------------------------------


def test_status_json(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "status", "--json", "--config", "config.toml")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["counts"] == {"pending": 1, "held": 0, "sent": 3, "failed": 5}
    assert report["quarantine"] == 2
    assert report["failed_by_status"] == [
        {"last_status": 422, "count": 3},
        {"last_status": 404, "count": 1},
        {"last_status": 500, "count": 1},
    ]
    oldest = report["oldest_pending"]
    assert (oldest["vehicle_id"], oldest["event_ts"]) == (A, "2023-10-25T16:03:00.000Z")
    assert 9.9 * DAY < oldest["waiting_seconds"] < 10.1 * DAY
    assert oldest["age_seconds"] > 365 * DAY
    (lane,) = report["backlog_vehicles"]
    assert (lane["vehicle_id"], lane["count"], lane["oldest_event_ts"]) == (
        A,
        1,
        oldest["event_ts"],
    )
    assert (lane["attempts"], lane["last_status"], lane["last_error"]) == (0, None, None)
    assert report["held_vehicles"] == []
    assert report["last_error"]["message"] == "HTTP 422: bad"
    # All five dead letters (marked at one instant; test_admin checks the order).
    assert sorted(
        (e["vehicle_id"], e["event_ts"][11:16], e["status"], e["last_status"])
        for e in report["recent_errors"]
    ) == [
        (B, "16:00", "failed", 422),
        (GONE, "16:00", "failed", 500),
        (GONE, "16:01", "failed", 422),
        (A, "16:00", "failed", 422),
        (A, "16:01", "failed", 404),
    ]
    assert list(report["relay_state"]) == ["last_error"]
    assert report["schema_version"] == schema.latest_version()
    assert report["path"] == str(seeded)
    assert report["size_bytes"] == seeded.stat().st_size


# The keys `status --json` promises (README "Commands"); adding one is fine, renaming not.
STATUS_KEYS = {
    "generated_at", "schema_version", "path", "size_bytes", "wal_bytes", "counts",
    "quarantine", "oldest_pending", "backlog_vehicles", "pending_vehicle_count",
    "held_vehicles", "held_vehicle_count", "failed_by_status", "recent_errors",
    "last_error", "relay_state",
}  # fmt: skip
BACKLOG_KEYS = {
    "vehicle_id", "count", "oldest_event_ts", "oldest_age_seconds", "attempts",
    "next_attempt_at", "last_status", "last_error",
}  # fmt: skip
ERROR_KEYS = {
    "vehicle_id", "event_ts", "status", "attempts", "next_attempt_at", "updated_at",
    "last_status", "last_error",
}  # fmt: skip


def test_status_json_keys_are_stable(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "status", "--json", "--top", "3", "--config", "config.toml")
    assert code == 0
    report = json.loads(out)
    assert set(report) == STATUS_KEYS
    assert [set(e) for e in report["backlog_vehicles"]] == [BACKLOG_KEYS]
    assert [set(e) for e in report["recent_errors"]] == [ERROR_KEYS] * 3
    assert set(report["relay_state"]["last_error"]) == {"value", "updated_at"}


def test_status_text(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(seeded)
    code, out, _ = cli(capsys, "status", "--config", "config.toml")
    assert code == 0
    assert f"outbox                 {seeded}\n" in out
    assert f"  {'failed':<20} 5\n" in out
    assert "oldest pending         2023-10-25T16:03:00.000Z  vehicle 9876543\n" in out
    assert "last Cartrack error" in out
    assert snapshot(seeded) == before


# -- requeue ---------------------------------------------------------------------------

REQUEUE_CASES = [
    pytest.param(
        [],
        {f"{A}@16:00": "pending", f"{A}@16:01": "pending", f"{B}@16:00": "pending",
         f"{GONE}@16:00": "held", f"{GONE}@16:01": "held"},
        "requeued 5 failed rows (3 to pending, 2 to held: no VIN in [vehicles] for 5555555)",
        id="all-failed",
    ),
    pytest.param(
        ["--vehicle", A],
        {f"{A}@16:00": "pending", f"{A}@16:01": "pending"},
        "requeued 2 failed rows",
        id="one-vehicle",
    ),
    pytest.param(
        ["--vehicle", B, "--vehicle", GONE],
        {f"{B}@16:00": "pending", f"{GONE}@16:00": "held", f"{GONE}@16:01": "held"},
        "requeued 3 failed rows (1 to pending, 2 to held",
        id="two-vehicles",
    ),
    pytest.param(
        ["--since", "2023-10-25T16:01:00Z"],
        {f"{A}@16:01": "pending", f"{GONE}@16:01": "held"},
        "requeued 2 failed rows",
        id="since",
    ),
    pytest.param(
        ["--until", "2023-10-25T18:01:00+02:00"],  # 16:01Z, exclusive
        {f"{A}@16:00": "pending", f"{B}@16:00": "pending", f"{GONE}@16:00": "held"},
        "requeued 3 failed rows",
        id="until-with-offset",
    ),
    pytest.param(
        ["--since", "2023-10-25T16:00:30Z", "--until", "2023-10-25T16:01:30Z", "--vehicle", A],
        {f"{A}@16:01": "pending"},
        "requeued 1 failed row\n",
        id="window-and-vehicle",
    ),
    pytest.param(
        ["--status", "sent"],
        {f"{A}@16:02": "pending", f"{B}@16:01": "pending", f"{B}@16:02": "pending"},
        "requeued 3 sent rows",
        id="sent",
    ),
    pytest.param(
        ["--status", "sent", "--vehicle", B, "--since", "2023-10-25T16:02:00Z"],
        {f"{B}@16:02": "pending"},
        "requeued 1 sent row\n",
        id="sent-filtered",
    ),
    pytest.param(
        ["--vehicle", "no-such-vehicle"],
        {},
        "requeued 0 failed rows\n",
        id="nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "changed", "message"), REQUEUE_CASES)
def test_requeue(
    seeded: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    changed: dict[str, str],
    message: str,
) -> None:
    before = snapshot(seeded)
    code, out, _ = cli(capsys, "requeue", "--dry-run", "--config", "config.toml", *args)
    assert code == 0
    assert out.startswith(message.replace("requeued", "would requeue"))
    assert "picks them up" not in out
    assert snapshot(seeded) == before

    code, out, _ = cli(capsys, "requeue", "--config", "config.toml", *args)
    assert code == 0
    assert out.startswith(message)
    assert ("a running daemon picks them up within 5 s" in out) == bool(changed)
    assert statuses(seeded) == SEEDED | changed
    for row in rows(seeded):
        key = f"{row['vehicle_id']}@{row['event_ts'][11:16]}"
        if key in changed:
            assert row["attempts"] == 0
            assert parse_timestamp(row["next_attempt_at"]) / 1000 > time.time() - 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "argument --since: 'yesterday' is not an ISO-8601 time"),
        (["--until", "2023-02-30T00:00:00Z"], "argument --until: '2023-02-30T00:00:00Z' is not"),
        (
            ["--since", "2023-10-25T17:00:00Z", "--until", "2023-10-25T16:00:00Z"],
            "error: --since (2023-10-25T17:00:00.000Z) must be before --until",
        ),
        (["--status", "pending"], "argument --status: invalid choice: 'pending'"),
    ],
)
def test_requeue_rejects_bad_filters(
    seeded: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = snapshot(seeded)
    code, out, err = cli(capsys, "requeue", "--config", "config.toml", *args)
    assert (code, out) == (2, "")
    assert message in err
    assert snapshot(seeded) == before


# -- purge -----------------------------------------------------------------------------

PURGE_CASES = [
    pytest.param([], {f"{A}@16:02"}, "deleted 1 sent row older than 7 days", 0, id="default-keep"),
    pytest.param(
        ["--older-than-days", "0.5"],
        {f"{A}@16:02", f"{B}@16:01", f"{B}@16:02"},
        "deleted 3 sent rows older than 0.5 days",
        0,
        id="half-day",
    ),
    pytest.param(
        ["--older-than-days", "0"],
        {f"{A}@16:02", f"{B}@16:01", f"{B}@16:02"},
        "deleted 3 sent rows of any age",
        0,
        id="all-sent",
    ),
    pytest.param(
        ["--quarantine"],
        {f"{A}@16:02"},
        "deleted 1 sent row and 1 quarantine row older than 7 days",
        1,
        id="quarantine",
    ),
    pytest.param(
        ["--quarantine", "--older-than-days", "0"],
        {f"{A}@16:02", f"{B}@16:01", f"{B}@16:02"},
        "deleted 3 sent rows and 2 quarantine rows of any age",
        2,
        id="everything",
    ),
    pytest.param(
        ["--older-than-days", "30"], set(), "deleted 0 sent rows older than 30 days", 0, id="none"
    ),
]


@pytest.mark.parametrize(("args", "deleted", "message", "quarantined"), PURGE_CASES)
def test_purge(
    seeded: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    deleted: set[str],
    message: str,
    quarantined: int,
) -> None:
    before = snapshot(seeded)
    code, out, _ = cli(capsys, "purge", "--dry-run", "--config", "config.toml", *args)
    assert code == 0
    assert out == message.replace("deleted", "would delete") + "\n"
    assert snapshot(seeded) == before

    code, out, _ = cli(capsys, "purge", "--config", "config.toml", *args)
    assert code == 0
    assert out == message + "\n"
    # Pending, held and failed rows are never purged.
    assert statuses(seeded) == {k: v for k, v in SEEDED.items() if k not in deleted}
    conn = sqlite3.connect(seeded)
    assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 2 - quarantined
    conn.close()


def test_purge_uses_keep_sent_days_from_the_config(
    seeded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(seeded.parent, keep=0.5)
    code, out, _ = cli(capsys, "purge", "--config", "config.toml")
    assert (code, out) == (0, "deleted 3 sent rows older than 0.5 days\n")


@pytest.mark.parametrize("days", ["-1", "nan", "inf", "a week"])
def test_purge_rejects_bad_ages(
    seeded: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    before = snapshot(seeded)
    code, _, err = cli(capsys, "purge", "--config", "config.toml", "--older-than-days", days)
    assert code == 2
    assert err.startswith(
        f"cartrack-relay purge: error: argument --older-than-days: '{days}' is not a number >= 0"
    )
    assert snapshot(seeded) == before


# -- outbox files the commands must not touch -------------------------------------------


def _foreign(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.close()


def _newer(db: Path) -> None:
    schema.connect(db, create=True).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda db: db.write_bytes(b"\x00garbage" * 512), "not a usable outbox database"),
        (lambda db: db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000), "not a usable outbox"),
        (_foreign, "holds tables that are not a cartrack-relay outbox (invoices)"),
        (_newer, "schema version 99 is newer than this relay understands"),
        (lambda db: db.mkdir(), "not a regular file"),
        (lambda db: db.write_bytes(b""), "empty file, no outbox yet"),
    ],
    ids=["garbage", "bad-header", "foreign", "newer", "directory", "empty"],
)
@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"], ["inspect", A], ["requeue"], ["purge", "--quarantine"]],
)
def test_unusable_outbox_exit_3_and_file_untouched(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Any],
    message: str,
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    db = tmp_path / "outbox.sqlite3"
    make(db)
    before = db.read_bytes() if db.is_file() else None
    code, out, err = cli(capsys, *command, "--config", "config.toml")
    assert (code, out) == (3, "")
    assert err.startswith(f"outbox error: {db}: ")
    assert message in err
    assert (db.read_bytes() if db.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "outbox.sqlite3"]


def test_a_locked_outbox_is_a_one_line_runtime_error(
    seeded: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon holds the write lock longer than the busy timeout (shrunk for the test).
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    before = snapshot(seeded)
    holder = sqlite3.connect(seeded, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        code, out, err = cli(capsys, "requeue", "--config", "config.toml")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (code, out) == (1, "")
    assert err == f"error: {seeded}: database is locked\n"
    assert snapshot(seeded) == before


def test_status_reads_while_a_writer_holds_the_lock(
    seeded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = sqlite3.connect(seeded, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE positions SET status = 'sent' WHERE status = 'pending'")
    try:
        code, out, _ = cli(capsys, "status", "--json", "--config", "config.toml")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 0
    # WAL: the reader sees the last committed state, not the writer's pending change.
    assert json.loads(out)["counts"]["pending"] == 1


# -- usage -----------------------------------------------------------------------------


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"cartrack-relay {relay.__version__}\n"
    assert main(["requeue", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--vehicle", "--since", "--until", "--status", "--dry-run"):
        assert option in help_text
    assert main(["inspect", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("VEHICLE_ID", "--event-id", "--from", "--to", "--limit", "--json"):
        assert option in help_text


@pytest.mark.parametrize(
    "args",
    [
        ["launch"],
        ["purge", "--older-than-days"],
        ["fake-cartrack", "--port", "70000"],
        ["simulate", "--url", "http://127.0.0.1:1/", "--token", "t", "--interval", "0"],
        ["demo", "--vehicles", "0"],
        ["demo", "--duration", "-5"],
    ],
)
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert err.startswith("cartrack-relay")


def test_config_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[frotcom]\ntokens = ["{TOKEN}"]\n')
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    code, out, _ = cli(capsys, "check-config", "--config", str(path))
    assert code == 0
    assert API_KEY not in out
