"""The demo is the README's first command: it must keep working end to end."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from relay.devtools.demo import run_demo


async def test_demo_relays_every_simulated_position(tmp_path: Path) -> None:
    out = io.StringIO()
    code = await run_demo(tmp_path / "demo", vehicles=3, duration=0.6, interval=0.2, out=out)
    assert code == 0
    text = out.getvalue()
    assert "relay    http://127.0.0.1:" in text
    db = tmp_path / "demo" / "outbox.sqlite3"
    conn = sqlite3.connect(db)
    try:
        counts = dict(conn.execute("SELECT status, count(*) FROM positions GROUP BY status"))
        quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    finally:
        conn.close()
    # Every simulated position was valid, stored and delivered; nothing rejected.
    assert quarantined == 0
    assert counts.get("sent", 0) >= 3
    assert set(counts) == {"sent"}
    final = text.strip().splitlines()
    assert any(line.startswith("Cartrack stand-in accepted") for line in final)
    assert "(0 answered with an error)" in text


@pytest.mark.slow
def test_demo_command_exits_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "demo",
            "--duration",
            "0.5",
            "--interval",
            "0.2",
            "--vehicles",
            "2",
            "--dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Cartrack stand-in accepted" in result.stdout
    assert "Traceback" not in result.stderr
