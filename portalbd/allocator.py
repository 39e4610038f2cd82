"""Keep glibc's allocator from holding memory the daemon has freed.

SlateDB (Rust, on the system allocator) and the binding threads allocate
and free large buffers from many threads. glibc gives each thread that
contends an arena of its own (up to 8 per core) and returns little of it to
the kernel, so RSS climbs far above the configured budgets although the
memory is free. Two arenas, and a trim after bursts of work, keep RSS near
what is really in use. Both are no-ops where glibc is not the allocator.

Measured (benchmarks/memory.py, 3 GiB written, default settings): glibc
held 230-360 MiB free but resident beside 200-300 MiB in use, mostly 64 KiB
values freed in the middle of the heap, which only ``malloc_trim`` gives
back. Trimming every second keeps RSS within about a second's worth of
churn of what is in use, for no CPU that the benchmark could tell apart;
every 5 s let RSS reach twice the memory in use between trims. A trim
holds each arena's lock while it walks the free chunks: 41 ms to give back
160 MiB in 2,500 holes, 2.5 ms with nothing to give, so trimming often also
keeps each pause short. Serving
blocks from mmap'd chunks instead (a fixed ``M_MMAP_THRESHOLD`` below the
block size) returned memory at once but doubled the daemon's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging

log = logging.getLogger("portalbd")

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
ARENAS = 2
TRIM_INTERVAL_S = 1.0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def limit_arenas() -> bool:
    """Cap malloc arenas; call before SlateDB starts its threads."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, ARENAS))


def trim() -> None:
    """Give free heap pages back to the kernel (blocking: run it off the loop)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


async def trim_forever(interval: float | None = None) -> None:
    """Trim now and then on a worker thread, while the daemon runs (TRIM_INTERVAL_S)."""
    if _LIBC is None:
        return
    while True:
        await asyncio.sleep(TRIM_INTERVAL_S if interval is None else interval)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(trim)
