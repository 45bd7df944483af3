"""`inspect`: where is my position? Real outboxes written by the daemon's own storage code."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, TOKEN, VIN, VIN2, batch, position, snapshot

from relay import admin
from relay.cli import main
from relay.config import Config
from relay.mapping import parse_batch
from relay.outbox.storage import Outbox
from relay.timeutil import format_ms, parse_timestamp

A, B, UNMAPPED, COLON = "9876543", "1111111", "5555555", "9876543:1"
T0 = parse_timestamp("2023-10-25T16:00:00Z")
RECEIVED = T0 + 3_600_000
DAY_MS = 86_400_000


def at(ms: int) -> Callable[[], float]:
    return lambda: ms / 1000


def ts(minute: int) -> str:
    return format_ms(T0 + minute * 60_000)


def minutes(*ms: int) -> list[dict[str, Any]]:
    return [position(ts=ts(m)) for m in ms]


async def store(
    outbox: Outbox, body: dict[str, Any], provider: str = "frotcom", received: int = RECEIVED
) -> None:
    everyone = {A: VIN, B: VIN2, COLON: VIN}
    parsed = parse_batch(body, received, DAY_MS)
    await outbox.store_batch(parsed, everyone, provider, received)


def row_id(db: Path, vehicle_id: str, minute: int) -> int:
    conn = sqlite3.connect(db)
    try:
        (found,) = conn.execute(
            "SELECT id FROM positions WHERE vehicle_id = ? AND event_ts = ?",
            (vehicle_id, ts(minute)),
        ).fetchone()
    finally:
        conn.close()
    return int(found)


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(vehicles={A: VIN, B: VIN2, COLON: VIN})


@pytest.fixture
async def seeded(config: Config) -> Path:
    """Vehicle A through every state, and neighbours whose rows must not show up.

    A@16:00 sent 202, A@16:01 sent 409, A@16:02 failed 422, A@16:03 pending retrying
    503, A@16:04 pending fresh; two quarantined inputs of A; B@16:00..02 pending;
    9876543:1 (an id that starts like A's) @16:00..01; UNMAPPED@16:00 held.
    """
    db = config.outbox.path
    outbox = await Outbox.open(db, clock=at(RECEIVED))
    try:
        await store(
            outbox,
            batch(
                (A, minutes(0, 1, 2, 3, 4)),
                (B, minutes(0, 1, 2)),
                (COLON, minutes(0, 1)),
                (UNMAPPED, minutes(0)),
            ),
        )
        await store(outbox, batch((A, [position(Speed=-1), position(ts="whenever")])))
        outbox.clock = at(RECEIVED + 1_000)
        await outbox.mark_sent([(row_id(db, A, 0), 202), (row_id(db, A, 1), 409)])
        outbox.clock = at(RECEIVED + 2_000)
        await outbox.mark_failed(row_id(db, A, 2), 422, '{"detail":\n "chassis_number unknown"}')
        outbox.clock = at(RECEIVED + 3_000)
        await outbox.mark_retry(row_id(db, A, 3), format_ms(RECEIVED + 33_000), 503, "busy")
    finally:
        await outbox.close()
    return db


def entry(minute: int, status: str, **fields: Any) -> dict[str, Any]:
    base = {
        "event_ts": ts(minute),
        "status": status,
        "event_type": "PERIODIC",
        "attempts": 0,
        "next_attempt_at": None,
        "received_at": format_ms(RECEIVED),
        "updated_at": format_ms(RECEIVED),
        "sent_at": None,
        "last_status": None,
        "last_error": None,
        "provider_event_id": f"frotcom:{A}:{ts(minute)}",
    }
    return base | fields


async def test_a_vehicle_in_every_state(config: Config, seeded: Path) -> None:
    report = admin.inspect_vehicle(config, A, clock=at(RECEIVED + 60_000))
    sent = format_ms(RECEIVED + 1_000)
    assert report["positions"] == [
        entry(0, "sent", attempts=1, updated_at=sent, sent_at=sent, last_status=202),
        entry(1, "sent", attempts=1, updated_at=sent, sent_at=sent, last_status=409),
        entry(
            2,
            "failed",
            attempts=1,
            updated_at=format_ms(RECEIVED + 2_000),
            last_status=422,
            last_error='{"detail": "chassis_number unknown"}',
        ),
        entry(
            3,
            "pending",
            attempts=1,
            next_attempt_at=format_ms(RECEIVED + 33_000),
            updated_at=format_ms(RECEIVED + 3_000),
            last_status=503,
            last_error="busy",
        ),
        entry(4, "pending", next_attempt_at=format_ms(RECEIVED)),
    ]
    assert report["counts"] == {"pending": 2, "held": 0, "sent": 2, "failed": 1}
    assert report["total"] == 5
    assert report["quarantine"]["total"] == 2
    reasons = [q["reason"] for q in report["quarantine"]["rows"]]
    assert len(reasons) == 2
    assert any("Speed" in r for r in reasons)
    assert any("Timestamp" in r for r in reasons)
    assert report["generated_at"] == format_ms(RECEIVED + 60_000)

    text = admin.render_inspect(report)
    lines = text.splitlines()
    assert lines[0] == (
        f"vehicle {A}: 5 positions (2 pending, 2 sent, 1 failed), 2 quarantined inputs"
    )
    table = lines[2:8]
    assert table[0].split() == [
        "EVENT", "TS", "STATUS", "ATTEMPTS", "NEXT", "ATTEMPT", "SENT", "AT", "CARTRACK", "EVENT", "ID"
    ]  # fmt: skip
    assert table[1].split() == [
        ts(0), "sent", "1", "-", sent, "HTTP", "202", f"frotcom:{A}:{ts(0)}"
    ]  # fmt: skip
    assert table[3].split()[:7] == [ts(2), "failed", "1", "-", "-", "HTTP", "422:"]
    assert '{"detail": "chassis_number unknown"}' in table[3]
    assert table[4].split()[:8] == [
        ts(3), "pending", "1", format_ms(RECEIVED + 33_000), "-", "HTTP", "503:", "busy"
    ]  # fmt: skip
    assert table[5].split() == [
        ts(4),
        "pending",
        "0",
        format_ms(RECEIVED),
        "-",
        "-",
        f"frotcom:{A}:{ts(4)}",
    ]
    assert "quarantined input for this vehicle: 2" in text


async def test_other_vehicles_never_show(config: Config, seeded: Path) -> None:
    # COLON's ids (frotcom:9876543:1:...) sort inside A's id range; B's do not.
    report = admin.inspect_vehicle(config, COLON)
    assert [p["event_ts"] for p in report["positions"]] == [ts(0), ts(1)]
    assert report["quarantine"] == {"total": 0, "rows": []}
    held = admin.inspect_vehicle(config, UNMAPPED)
    assert [(p["status"], p["next_attempt_at"]) for p in held["positions"]] == [("held", None)]
    nobody = admin.inspect_vehicle(config, "404")
    assert (nobody["total"], nobody["positions"]) == (0, [])
    assert admin.render_inspect(nobody) == "vehicle 404: 0 positions"


@pytest.mark.parametrize(
    ("since", "until", "limit", "shown", "total"),
    [
        (None, None, 50, [0, 1, 2, 3, 4], 5),
        (None, None, 2, [3, 4], 5),  # the newest, in time order
        (ts(1), None, 50, [1, 2, 3, 4], 4),  # from: inclusive
        (None, ts(3), 50, [0, 1, 2], 3),  # to: exclusive
        ("2023-10-25T18:01:00+02:00", "2023-10-25 16:03:30", 50, [1, 2, 3], 3),
        (ts(1), ts(4), 1, [1], 3),  # with --from: the first from there
        (ts(1), None, 2, [1, 2], 4),
        (None, ts(4), 2, [2, 3], 4),  # only --to: the newest before it
        ("2024-01-01T00:00:00Z", None, 50, [], 0),
    ],
)
async def test_window_and_limit(
    config: Config,
    seeded: Path,
    since: str | None,
    until: str | None,
    limit: int,
    shown: list[int],
    total: int,
) -> None:
    report = admin.inspect_vehicle(config, A, since=since, until=until, limit=limit)
    assert [p["event_ts"] for p in report["positions"]] == [ts(m) for m in shown]
    assert report["total"] == total
    summary = admin.render_inspect(report).splitlines()[0]
    which = "first" if since else "newest"
    assert (f"showing the {which} {len(shown)}" in summary) == (len(shown) < total)
    if since or until:
        assert " from " in summary


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        ("yesterday", None, "since: 'yesterday' is not an ISO-8601 time"),
        (ts(3), ts(1), "since: must be before until"),
    ],
)
def test_unusable_window(config: Config, since: str, until: str | None, message: str) -> None:
    with pytest.raises(admin.FilterError, match=message):
        admin.inspect_vehicle(config, A, since=since, until=until)


async def test_positions_of_every_provider_are_found(
    make_config: Callable[..., Config],
) -> None:
    # Rows written under an earlier provider name, and under the configured one, which
    # contains the separator: inspect finds both, and each row once.
    config = make_config(cartrack={"provider": "fleet:eu"}, vehicles={A: VIN})
    outbox = await Outbox.open(config.outbox.path, clock=at(RECEIVED))
    try:
        await store(outbox, batch((A, minutes(0, 1))), provider="legacy")
        await store(outbox, batch((A, minutes(1, 2))), provider="fleet:eu")
        await store(outbox, batch((A, minutes(3))), provider="fleet")
    finally:
        await outbox.close()
    report = admin.inspect_vehicle(config, A)
    assert [p["provider_event_id"] for p in report["positions"]] == [
        f"legacy:{A}:{ts(0)}",
        f"legacy:{A}:{ts(1)}",  # same instant: the first stored first
        f"fleet:eu:{A}:{ts(1)}",
        f"fleet:eu:{A}:{ts(2)}",
        f"fleet:{A}:{ts(3)}",
    ]
    assert report["total"] == 5


async def test_one_event_by_its_id(config: Config, seeded: Path) -> None:
    event_id = f"frotcom:{A}:{ts(2)}"
    report = admin.inspect_event(config, event_id)
    assert report["vehicle_id"] == A
    assert [(p["status"], p["last_status"]) for p in report["positions"]] == [("failed", 422)]
    assert admin.render_inspect(report).splitlines()[0] == f"event {event_id}: failed, vehicle {A}"
    missing = admin.inspect_event(config, f"frotcom:{A}:{ts(9)}")
    assert (missing["total"], missing["positions"], missing["vehicle_id"]) == (0, [], None)
    assert "not in the outbox" in admin.render_inspect(missing)


# -- the command line -------------------------------------------------------------------


@pytest.fixture
def config_file(config: Config, tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[frotcom]\ntokens = ["{TOKEN}"]\n[cartrack]\napi_key = "{API_KEY}"\n'
        f'[outbox]\npath = "{config.outbox.path}"\n[vehicles]\n"{A}" = "{VIN}"\n'
    )
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    if code:
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
    return code, out, err


async def test_cli_text_and_json(
    seeded: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(seeded)
    code, out, err = cli(capsys, "inspect", A, "--config", str(config_file), "--limit", "2")
    assert (code, err) == (0, "")
    assert out.startswith(f"vehicle {A}: 5 positions (2 pending, 2 sent, 1 failed),")
    assert "showing the newest 2" in out
    assert ts(4) in out
    assert ts(2) not in out

    code, out, _ = cli(
        capsys, "inspect", A, "--json", "--from", ts(1), "--to", ts(3), "--config", str(config_file)
    )
    assert code == 0
    report = json.loads(out)
    assert [p["event_ts"] for p in report["positions"]] == [ts(1), ts(2)]
    assert (report["since"], report["until"], report["total"]) == (ts(1), ts(3), 2)

    event_id = f"frotcom:{A}:{ts(3)}"
    code, out, _ = cli(
        capsys, "inspect", "--event-id", event_id, "--json", "--config", str(config_file)
    )
    assert code == 0
    assert json.loads(out)["positions"][0]["last_error"] == "busy"
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: give either VEHICLE_ID or --event-id"),
        ([A, "--event-id", "frotcom:1:x"], "error: give either VEHICLE_ID or --event-id"),
        (["--event-id", "x", "--from", ts(0)], "error: --from and --to go with VEHICLE_ID"),
        ([A, "--from", "yesterday"], "argument --from: 'yesterday' is not an ISO-8601 time"),
        ([A, "--to", "2023-02-30T00:00:00Z"], "argument --to: '2023-02-30T00:00:00Z' is not"),
        ([A, "--from", ts(2), "--to", ts(1)], f"error: --from ({ts(2)}) must be before --to"),
        ([A, "--limit", "0"], "argument --limit: '0' is not a whole number from 1 to 100000"),
    ],
)
async def test_cli_bad_input_names_the_flag(
    seeded: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = cli(capsys, "inspect", "--config", str(config_file), *args)
    assert (code, out) == (2, "")
    assert message in err


def test_cli_without_an_outbox_exits_3(
    config_file: Path, config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "inspect", A, "--config", str(config_file))
    assert (code, out) == (3, "")
    assert err.startswith(f"outbox error: {config.outbox.path}: no outbox here")
    assert not config.outbox.path.exists()
