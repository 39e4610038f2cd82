"""The glibc fact portalbd/allocator.py is built on, checked on this very allocator.

Blocks freed between blocks still in use stay resident until ``malloc_trim``:
that is why the daemon trims every second (benchmarks/memory.py measured
RSS at twice the memory in use with a trim every 5 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from portalbd import allocator

pytestmark = pytest.mark.skipif(not allocator.limit_arenas(), reason="glibc malloc only")

BLOCK = 64 * 1024  # the device's default block: the values that churn
MIB = 1 << 20


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_trim_returns_blocks_freed_between_live_ones() -> None:
    allocator.trim()
    values = [bytes([i % 251]) * BLOCK for i in range(1024)]  # 64 MiB, every page touched
    kept = values[::8]  # live blocks all through the heap, like a cache's
    del values
    held = rss_anon()
    allocator.trim()
    released = held - rss_anon()
    assert released >= 32 * MIB, f"trim gave back {released / MIB:.1f} MiB of 56 MiB freed"
    assert len(kept) == 128
