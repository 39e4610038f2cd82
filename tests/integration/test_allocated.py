"""`allocated_bytes` in status against a real daemon: writes, trims, a restore, a restart."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import nbd

from portalbd.control.client import request_once
from tests.conftest import DaemonFactory
from tests.support import BIN, RunningDaemon, connected

BLOCK = 64 * 1024  # the default block size


def allocated(daemon: RunningDaemon, expected: int, limit: float = 20) -> None:
    """Wait for the count to reach `expected` blocks (drains and the opening scan are async)."""
    deadline = time.monotonic() + limit
    while True:
        got = daemon.status()["stats"].get("allocated_bytes")
        if got == expected * BLOCK:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"allocated_bytes {got}, expected {expected} blocks")
        time.sleep(0.05)


def test_allocated_bytes_follow_writes_trims_restores_and_restarts(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path / 'data'}"
    daemon = daemon_factory(storage_url=url, instance="a")
    allocated(daemon, 0)
    with connected(daemon.uri) as h:
        for block in (0, 3, 7):
            h.pwrite(b"d" * 4096, block * BLOCK + 8192)  # a page: the block holds data
        h.zero(BLOCK, 9 * BLOCK, nbd.CMD_FLAG_NO_HOLE)  # allocated zeros: counted
        h.flush()
        allocated(daemon, 4)
        h.trim(BLOCK, 3 * BLOCK)  # a whole block trimmed: a hole again
        h.flush()
        allocated(daemon, 3)
        assert request_once(daemon.control_socket, {"SnapshotCreate": {"name": "s"}})
        h.pwrite(b"e" * (2 * BLOCK), 20 * BLOCK)
        h.flush()
        allocated(daemon, 5)
        shown = subprocess.run(
            [str(BIN / "portalctl"), "--socket", str(daemon.control_socket), "status"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "Allocated: 320.0 KiB (blocks holding data)" in " ".join(shown.split())
        assert request_once(daemon.control_socket, {"SnapshotRestore": {"name": "s"}}) == "Ok"
        allocated(daemon, 3)  # counted again, on the snapshot's disk
    assert daemon.stop() == 0
    again = daemon_factory(storage_url=url, instance="a")
    allocated(again, 3)  # the opening scan finds what is stored
    assert "allocation scan done: 3 of 16384 blocks hold data" in again.log()
