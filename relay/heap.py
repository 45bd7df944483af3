"""glibc's malloc, told to keep the heap pages the relay's requests churn through.

asyncio reads a socket into a fresh 256 KiB buffer (``recv(256 * 1024)``), and every
Cartrack response and webhook request allocates and frees one. glibc's defaults make
that expensive for a daemon: a block over its mmap threshold (128 KiB, moved about at
run time) is mapped and unmapped per call, and a freed block at the top of the heap
over the trim threshold is handed back to the kernel, so the next request faults the
same pages in again. Measured with ``perf stat`` on the ``serve`` process while it
drained a 40k backlog at concurrency 64: 0.8-2.2 page faults per event with glibc's
defaults, 0.20-0.21 with the thresholds below (0.21 at concurrency 16 either way),
and 115-137 against 134-161 us of CPU per event in 9 alternating pairs, lower in 8.
Webhooks: 0.12 -> 0.07 page faults per position.

The price: up to TRIM_THRESHOLD of freed heap stays with the process instead of going
back to the kernel. The relay's memory is bounded by design (bench.backlog: ~100 MB
at 1M rows), and its peak does not change.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks under 1 MiB come from the heap (a socket buffer is 256 KiB); setting it also
# stops glibc moving the threshold about. Free heap up to 32 MiB is kept.
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 32 << 20


def tune_malloc() -> str | None:
    """Set the thresholds; None when done, else why not (not glibc, no mallopt)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "mallopt not found"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 on failure.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "mallopt refused M_MMAP_THRESHOLD"
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "mallopt refused M_TRIM_THRESHOLD"
    return None
