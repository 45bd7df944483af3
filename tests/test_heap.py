"""relay.heap: socket buffers stop costing page faults once malloc is tuned."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from relay import heap

# What the event loop does per response or request: recv into a 256 KiB buffer (asyncio's
# read size), keep a few dozen answers alive (connections in flight), with a second
# thread in the process (the outbox writer's). Prints minor page faults per recv.
CHURN = """
import resource, socket, sys, threading
if sys.argv[1] == "tuned":
    from relay.heap import tune_malloc
    assert tune_malloc() is None
a, b = socket.socketpair()
kept = []
def churn(n):
    for _ in range(n):
        a.send(b"x" * 300)
        kept.append(b.recv(256 * 1024))
        if len(kept) > 64:
            kept.pop(0)
thread = threading.Thread(target=lambda: sum(range(10**5)))
thread.start()
thread.join()
churn(1000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(10000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10000)
"""


def faults_per_recv(mode: str) -> float:
    # A process of its own: the thresholds are process-wide and stay set.
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_socket_buffers_cost_no_page_faults_once_tuned() -> None:
    default, tuned = faults_per_recv("default"), faults_per_recv("tuned")
    # With glibc's defaults each recv faulted two pages in again (measured 2.0 here).
    assert tuned < 0.05, (default, tuned)
    assert tuned <= default


def test_other_c_libraries_keep_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # musl (Alpine) has no glibc thresholds to set; the relay says so and goes on.
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert heap.tune_malloc() == "not glibc"
