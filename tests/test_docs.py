"""The README and the example config are part of the product: keep them true."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import VIN, batch, position

from relay.config import load_config
from relay.mapping import parse_batch
from relay.outbox.storage import Outbox
from relay.timeutil import parse_timestamp

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def sql_blocks() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README, flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";") if s.strip()]
    return [
        "\n".join(line for line in s.splitlines() if not line.startswith("--")) for s in statements
    ]


def test_example_config_is_valid(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.example.toml", env={}, cwd=tmp_path)
    assert config.vehicles == {"9876543": VIN}
    assert config.outbox.path == tmp_path / "outbox.sqlite3"


def test_readme_has_the_five_operator_queries() -> None:
    assert len(sql_blocks()) == 5


@pytest.fixture
async def populated(tmp_path: Path) -> Path:
    """An outbox with a row in every status and a quarantined position."""
    db = tmp_path / "outbox.sqlite3"
    outbox = await Outbox.open(db)
    body: dict[str, Any] = batch(
        ("9876543", [position(f"2023-10-25T16:0{i}:00Z") for i in range(4)]),
        ("5555555", [position("2023-10-25T16:00:00Z"), {"Timestamp": "soon"}]),
    )
    now = parse_timestamp("2023-10-25T16:10:00Z")
    await outbox.store_batch(parse_batch(body, now, 86_400_000), {"9876543": VIN}, "frotcom", now)
    rows = await outbox.next_rows("9876543", 10)
    await outbox.mark_sent([(rows[0].id, 202)])
    await outbox.mark_failed(rows[1].id, 422, '{"error": "validation failed"}')
    await outbox.close()
    return db


@pytest.mark.parametrize("index", range(5))
def test_readme_queries_run_against_a_real_outbox(populated: Path, index: int) -> None:
    conn = sqlite3.connect(populated)
    try:
        result = conn.execute(sql_blocks()[index]).fetchall()
    finally:
        conn.close()
    # Each finds what it is about (the sent row was marked now, inside the last hour).
    assert result, sql_blocks()[index]


def test_every_test_the_readme_cites_exists() -> None:
    # "Delivery guarantees" names the test behind each promise: a rename must not
    # leave the README pointing at nothing.
    cited = set(re.findall(r"`(?:tests/)?(test_\w+\.py)::(test_\w+)`", README))
    assert len(cited) > 20
    missing = [
        f"{module}::{name}"
        for module, name in sorted(cited)
        if not re.search(
            rf"^(async )?def {name}\(", (ROOT / "tests" / module).read_text(), flags=re.M
        )
    ]
    assert missing == []
