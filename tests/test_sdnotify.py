"""The systemd notify protocol against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from relay.sdnotify import notify, reloading_message, watchdog, watchdog_interval


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A socket like systemd's, on a short path (AF_UNIX paths end at 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    """A socket in Linux's abstract namespace, spelled ``@name`` in $NOTIFY_SOCKET."""
    name = f"cartrack-relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


def test_ready_reaches_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1", env={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_ready_reaches_an_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    assert notify("READY=1\nSTATUS=accepting webhooks", env={"NOTIFY_SOCKET": address}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=accepting webhooks"


def test_reads_notify_socket_from_the_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_one_datagram_per_message(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    for message in ("READY=1", reloading_message(), "READY=1", "STOPPING=1"):
        assert notify(message, env=env)
    received = [sock.recv(4096).decode().splitlines()[0] for _ in range(4)]
    assert received == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "/nonexistent/cartrack-relay/notify"},
        {"NOTIFY_SOCKET": "@cartrack-relay-nobody-listens-here"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
        {"NOTIFY_SOCKET": "relative/notify"},
    ],
    ids=["unset", "empty", "missing-path", "missing-abstract", "vsock", "relative"],
)
def test_returns_false_when_nothing_can_be_told(env: dict[str, str]) -> None:
    assert notify("READY=1", env=env) is False


def test_without_the_variable_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_reloading_message_carries_the_monotonic_clock() -> None:
    before = time.monotonic_ns() // 1000
    lines = reloading_message().splitlines()
    after = time.monotonic_ns() // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": ""}, 0.05),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "\u0663"}, None),  # a digit, but not an ASCII one
        ({"WATCHDOG_PID": "4242"}, None),
    ],
    ids=[
        "usec",
        "our-pid",
        "empty-pid",
        "other-pid",
        "unset",
        "empty",
        "zero",
        "negative",
        "unit-suffix",
        "non-ascii-digit",
        "pid-only",
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_reads_this_process_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


async def test_watchdog_pings_until_cancelled(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(watchdog(0.01, env={"NOTIFY_SOCKET": path}))
    try:
        pings = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) for _ in range(3)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert pings == [b"WATCHDOG=1"] * 3
    assert task.cancelled()
