"""The systemd unit, checked by systemd's own tools, and the watchdog of the real daemon.

``systemd-analyze verify`` needs the unit's ExecStart= binary to exist, so it checks a
copy whose ExecStart points at a stand-in script; everything else is the shipped unit.
Without systemd-analyze (a CI image without systemd) those tests skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from proc import RelayProcess

from relay.cli import EXIT_CONFIG, EXIT_OUTBOX
from relay.config import API_KEY_CREDENTIAL, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "cartrack-relay.service"
EXEC = "/opt/cartrack-relay/bin/cartrack-relay"
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; a unit may repeat a key, so no dict."""
    found: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


# -- the unit as written -----------------------------------------------------------------


def test_unit_runs_serve_as_a_watched_notify_service() -> None:
    assert service("Type") == ["notify"]
    assert service("ExecStart") == [
        f"{EXEC} serve --config /etc/cartrack-relay/config.toml --log-format json"
    ]
    assert service("WatchdogSec") == ["30s"]
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service("Restart") == ["on-failure"]
    # A failing ExecStartPre would be restarted whatever its exit status.
    assert service("ExecStartPre") == []


def test_unit_does_not_restart_on_the_statuses_a_restart_cannot_fix() -> None:
    assert service("RestartPreventExitStatus") == [f"{EXIT_CONFIG} {EXIT_OUTBOX}"]


def test_unit_hands_the_api_key_over_as_the_credential_config_reads() -> None:
    assert service("LoadCredential") == [f"{API_KEY_CREDENTIAL}:/etc/cartrack-relay/api_key"]


def test_unit_runs_unprivileged_in_its_state_directory() -> None:
    assert service("User") == ["cartrack-relay"]
    assert service("StateDirectory") == ["cartrack-relay"]
    assert service("WorkingDirectory") == ["%S/cartrack-relay"]
    assert service("CapabilityBoundingSet") == [""]
    assert service("UMask") == ["0077"]


def test_readme_install_section_matches_the_unit_and_the_makefile() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("install-service", "uninstall-service"):
        assert f"sudo make {target}" in readme
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert f"LoadCredential={service('LoadCredential')[0]}" in readme
    assert f"WatchdogSec={service('WatchdogSec')[0]}" in readme
    # nginx's body limit in the README is the relay's default limit.
    size = re.search(r"client_max_body_size (\d+)m;", readme)
    assert size, "the nginx example lost its client_max_body_size"
    assert int(size.group(1)) * 1024 * 1024 == ServerConfig().max_body_bytes


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart= pointing at an executable that exists."""
    stand_in = tmp_path / "bin" / "cartrack-relay"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    assert EXEC in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(EXEC, str(stand_in)))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
        check=False,
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(unit_copy: Path) -> None:
    result = analyze("verify", str(unit_copy))
    # verify exits 0 on warnings such as an unknown or misspelt directive; they are
    # only on stderr, so stderr must be empty too.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_typo(unit_copy: Path) -> None:
    """The check above can fail: a misspelt directive is reported."""
    unit_copy.write_text(unit_copy.read_text().replace("ProtectHome=", "ProtectHomes="))
    result = analyze("verify", str(unit_copy))
    assert "ProtectHomes" in result.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(unit_copy: Path) -> None:
    result = analyze("security", "--offline=yes", str(unit_copy))
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"systemd-analyze too old for --offline: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    print(match.group(0))
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# -- the watchdog of the real daemon -----------------------------------------------------


async def receive_until(
    sock: socket.socket, received: list[str], done: Callable[[list[str]], bool]
) -> None:
    """Append datagrams to ``received`` until ``done(received)``; bounded in time and count."""
    loop = asyncio.get_running_loop()
    for _ in range(1000):
        if done(received):
            return
        received.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 20)).decode())
    raise AssertionError(f"gave up after 1000 datagrams: {received[-10:]}")


def first_lines(received: list[str]) -> list[str]:
    return [message.splitlines()[0] for message in received]


@pytest.mark.slow
async def test_watchdog_pings_keep_coming_while_the_relay_runs(
    spawn: Callable[..., RelayProcess], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    relay = spawn(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    relay.spawn()
    received: list[str] = []

    def pings_after_ready(messages: list[str]) -> int:
        lines = first_lines(messages)
        return lines[lines.index("READY=1") :].count("WATCHDOG=1") if "READY=1" in lines else 0

    await receive_until(sock, received, lambda m: pings_after_ready(m) >= 3)
    lines = first_lines(received)
    # The pinger starts before the outbox opens, so a ping precedes READY=1: the tests
    # below that see none have not merely stopped listening too early.
    assert lines.index("WATCHDOG=1") < lines.index("READY=1")
    assert set(lines) == {"WATCHDOG=1", "READY=1"}
    assert relay.events("watchdog_enabled")[0]["interval_seconds"] == 0.1

    relay.send_signal(signal.SIGTERM)
    await receive_until(sock, received, lambda m: "STOPPING=1" in m)
    assert await relay.wait() == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "watchdog_env",
    [
        pytest.param({}, id="no-WATCHDOG_USEC"),
        # The variables a child process inherited from a watched parent.
        pytest.param({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, id="other-pid"),
    ],
)
async def test_no_watchdog_pings_unless_this_process_is_watched(
    spawn: Callable[..., RelayProcess],
    notify_socket: tuple[socket.socket, str],
    watchdog_env: dict[str, str],
) -> None:
    sock, path = notify_socket
    relay = spawn(env={"NOTIFY_SOCKET": path, **watchdog_env})
    relay.spawn()
    received: list[str] = []
    await receive_until(sock, received, lambda m: "READY=1" in first_lines(m))
    relay.send_signal(signal.SIGTERM)
    await receive_until(sock, received, lambda m: "STOPPING=1" in m)
    assert await relay.wait() == 0
    while True:  # whatever else the process sent before it exited
        try:
            received.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    assert first_lines(received) == ["READY=1", "STOPPING=1"]
    assert relay.events("watchdog_enabled") == []
