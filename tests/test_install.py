"""``systemd/install.sh`` (``make install-service``) run for real into a temporary root.

DESTDIR keeps it off the host: no user is created, nothing is chowned, systemctl is
not called. Everything else is what ``sudo make install-service`` does: a venv, the
package installed into it (not editable), the unit, the config and the credential file,
and a second run that keeps whatever the operator has edited since.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import batch, position, rows
from proc import RelayProcess

import relay
from relay.config import API_KEY_CREDENTIAL, load_config
from relay.devtools.fake_cartrack import FakeCartrack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "systemd" / "install.sh"
README = (ROOT / "README.md").read_text(encoding="utf-8")
UNIT = ROOT / "systemd" / "cartrack-relay.service"
# Not the defaults, so the test also sees them written into the unit.
PREFIX = "/srv/relay"
SYSCONFDIR = "/etc/relay"
STATE = "var/lib/cartrack-relay"


def build_wheel(directory: Path) -> Path:
    """Our pure-Python wheel, built from setup.cfg's package data and entry points.

    pip needs the ``wheel`` package to build one from source, and nothing may be
    downloaded in a test; a wheel is a zip file with a manifest, so it is made here.
    """
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    files = [p for p in (ROOT / "relay").rglob("*.py") if "__pycache__" not in p.parts]
    for package, patterns in cfg["options.package_data"].items():
        base = ROOT.joinpath(*package.split("."))
        files += [f for pattern in patterns.split() for f in base.glob(pattern)]
    dist_info = f"cartrack_relay-{relay.__version__}.dist-info"
    entries = {p.relative_to(ROOT).as_posix(): p.read_bytes() for p in files}
    entries[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: cartrack-relay\nVersion: {relay.__version__}\n".encode()
    )
    entries[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = cfg["options.entry_points"]["console_scripts"].strip()
    entries[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{scripts}\n".encode()
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in entries.items()]
    entries[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"cartrack_relay-{relay.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def run_script(action: str, env: dict[str, str]) -> str:
    # The machine's pip configuration (mirrors, find-links) stays out of it: --no-index.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    result = subprocess.run(
        ["sh", str(SCRIPT), action],
        env={**clean, "PIP_CONFIG_FILE": os.devnull, **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_install_layout_then_reinstall_keeps_edits_then_uninstall_keeps_data(
    tmp_path: Path, wheel: Path
) -> None:
    root = tmp_path / "root"
    env = {
        "DESTDIR": str(root),
        "PREFIX": PREFIX,
        "SYSCONFDIR": SYSCONFDIR,
        "PACKAGE": str(wheel),
        "PIP_INSTALL_ARGS": "--no-index --no-deps",
        "PYTHON": sys.executable,
    }
    out = run_script("install", env)
    venv = root / PREFIX.lstrip("/")
    unit = root / "etc/systemd/system/cartrack-relay.service"
    confdir = root / SYSCONFDIR.lstrip("/")
    config, api_key = confdir / "config.toml", confdir / "api_key"

    # The package, installed into the venv as files of its own, not linked to this tree.
    found = subprocess.run(
        [str(venv / "bin/python"), "-c", "import relay; print(relay.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not this checkout, whose relay/ would shadow the installed one
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(venv), found
    migrations = Path(found).parent / "outbox" / "migrations"
    assert sorted(p.name for p in migrations.glob("*.sql"))
    assert os.access(venv / "bin/cartrack-relay", os.X_OK)

    # The shipped unit with the chosen paths, world-readable, root-writable.
    shipped = UNIT.read_text()
    expected = shipped.replace("/opt/cartrack-relay", PREFIX).replace(
        "/etc/cartrack-relay", SYSCONFDIR
    )
    assert expected != shipped
    assert unit.read_text() == expected
    assert (
        f"ExecStart={PREFIX}/bin/cartrack-relay serve --config {SYSCONFDIR}/config.toml" in expected
    )
    assert f"LoadCredential=cartrack_api_key:{SYSCONFDIR}/api_key" in expected
    assert mode(unit) == 0o644
    assert (mode(confdir), mode(config), mode(api_key)) == (0o750, 0o640, 0o600)
    assert api_key.read_bytes() == b""
    assert f"wrote {config}" in out
    assert not (root / STATE).exists(), "the outbox directory is systemd's to create"

    # The installed config takes the key from the systemd credential and names the
    # outbox by its absolute path; the installed command reads it.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / API_KEY_CREDENTIAL).write_text("key-from-credential\n")
    parsed = load_config(config, env={"CREDENTIALS_DIRECTORY": str(credentials)}, cwd=tmp_path)
    assert parsed.cartrack.api_key == "key-from-credential"
    assert parsed.outbox.path == Path("/var/lib/cartrack-relay/outbox.sqlite3")
    # The venv was installed without dependencies (no downloads): lend it this one's.
    checked = subprocess.run(
        [str(venv / "bin/cartrack-relay"), "check-config", "--config", str(config)],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "CREDENTIALS_DIRECTORY": str(credentials),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"config ok: {config}")
    assert "key-from-credential" not in checked.stdout

    # The operator edits, the service runs; a reinstall (an upgrade) keeps all of it.
    config.write_text(
        config.read_text() + '\n# edited by the operator\n"1234567" = "WDB9634031L654321"\n'
    )
    edited = config.read_bytes()
    api_key.write_text("the-real-key\n")
    outbox = root / STATE / "outbox.sqlite3"
    outbox.parent.mkdir(parents=True)
    outbox.write_bytes(b"SQLite format 3\x00 stand-in")
    (venv / "lib" / "stale-marker").write_text("from the first install")

    out = run_script("install", env)
    assert config.read_bytes() == edited
    assert api_key.read_text() == "the-real-key\n"
    assert outbox.read_bytes() == b"SQLite format 3\x00 stand-in"
    assert f"kept existing {config}" in out
    assert f"kept existing {api_key}" in out
    assert (venv / "lib" / "stale-marker").exists(), "the venv was rebuilt, not upgraded"

    out = run_script("uninstall", env)
    assert not venv.exists()
    assert not unit.exists()
    assert config.read_bytes() == edited
    assert api_key.read_text() == "the-real-key\n"
    assert outbox.exists()
    assert f"kept configuration: {confdir}" in out
    assert f"kept data: {root / STATE}" in out


def test_uninstall_leaves_a_prefix_that_is_not_our_venv_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    precious = root / "srv" / "data" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("not a venv")
    out = run_script("uninstall", {"DESTDIR": str(root), "PREFIX": "/srv/data"})
    assert precious.read_text() == "not a venv"
    assert "does not look like the cartrack-relay venv" in out


async def test_readme_backup_of_a_live_outbox_holds_every_acknowledged_row(
    tmp_path: Path, cartrack: FakeCartrack
) -> None:
    """The README's ``.backup`` command, run against the outbox of the running daemon."""
    sqlite = shutil.which("sqlite3")
    if sqlite is None:
        pytest.skip("the sqlite3 command-line shell is not installed")
    match = re.search(
        r"sqlite3 /var/lib/cartrack-relay/outbox\.sqlite3[\s\\]*\"(\.backup '[^']+')\"", README
    )
    assert match, "the README's backup command is gone"
    target = tmp_path / "backup" / "outbox-copy.sqlite3"
    target.parent.mkdir()
    dot_command = re.sub(r"'[^']+'", f"'{target}'", match.group(1))

    assert cartrack.url is not None
    # Cartrack is down: every row stays pending and the forwarder keeps writing retries
    # to the outbox while the backup reads it.
    cartrack.set_default(lambda event: 503)
    async with RelayProcess(tmp_path, cartrack.url) as relay:
        await relay.start()
        for minute in range(3):
            body = batch(
                ("9876543", [position(f"2023-10-25T16:{minute:02d}:{i:02d}Z") for i in range(50)])
            )
            status, answer = await relay.post(body)
            assert (status, answer["accepted"]) == (200, 50)
        acknowledged = {r["provider_event_id"] for r in rows(relay.db_path)}
        await cartrack.wait_for(lambda f: f.stats[503] >= 3)

        proc = await asyncio.create_subprocess_exec(
            sqlite,
            str(relay.db_path),
            dot_command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert (proc.returncode, out, err) == (0, b"", b"")
        assert relay.returncode() is None, "the relay did not survive the backup"
        assert await relay.stop() == 0

    assert len(acknowledged) == 150
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        backed_up = {r[0] for r in copy.execute("SELECT provider_event_id FROM positions")}
    finally:
        copy.close()
    assert backed_up == acknowledged
