"""The systemd notify protocol (``Type=notify``): one datagram per state change.

``serve`` sends ``READY=1`` once the port accepts connections, ``RELOADING=1`` ...
``READY=1`` around a SIGHUP reload and ``STOPPING=1`` when shutdown begins. With
``WatchdogSec=`` set, systemd passes $WATCHDOG_USEC and :func:`watchdog` pings
``WATCHDOG=1`` from the event loop. Outside systemd ($NOTIFY_SOCKET unset) every call
is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to $NOTIFY_SOCKET; False when not under systemd."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    elif not address.startswith("/"):
        return False  # vsock: and other transports systemd may offer are not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        # Readiness is a courtesy to the service manager; failing to announce it must
        # not stop the relay from serving.
        return False
    return True


def reloading_message() -> str:
    """``RELOADING=1`` with the timestamp systemd >= 253 requires alongside it."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of $WATCHDOG_USEC), or None: no watchdog.

    Like ``sd_watchdog_enabled()``: $WATCHDOG_PID, when set, must name this process,
    since a child that inherited the environment is not the one systemd watches.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isascii() or not usec.isdigit() or int(usec) == 0:
        return None
    watched = env.get("WATCHDOG_PID", "")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000


async def watchdog(interval: float, env: Mapping[str, str] | None = None) -> None:
    """Ping systemd every ``interval`` seconds until cancelled.

    It runs as a task on the relay's event loop on purpose: a loop that stops turning
    (a blocking call that hangs, a busy loop) stops the pings, and systemd restarts
    the service once ``WatchdogSec`` passes without one.
    """
    while True:
        notify("WATCHDOG=1", env)
        await asyncio.sleep(interval)
