"""A local store that fills up, turns read-only or disappears (issue 20, 2-3).

SlateDB retries a failing local write forever, once a second, and says
nothing; the daemon bounds every store operation ([storage] timeout_ms) so
clients get EIO, the log and ``status`` say what is wrong, shutdown ends,
and everything works again once the disk does. Real mounts: a tmpfs with a
size limit, a read-only bind mount.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected
from tests.support.tools import quiet, run

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]

MiB = 1 << 20
TIMEOUT_MS = 3000


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        quiet("umount", "-l", str(path), timeout=30)


def config(tmp_path: Path) -> Path:
    conf = tmp_path / "faults.toml"
    conf.write_text(
        f"[storage]\ntimeout_ms = {TIMEOUT_MS}\n"
        "[device]\ndirty_bytes = 8388608\n"
        "[lsm]\nl0_sst_size_bytes = 4194304\nmax_unflushed_bytes = 16777216\n"
    )
    return conf


def flush_outcome(daemon: RunningDaemon) -> tuple[str | None, float]:
    started = time.monotonic()
    try:
        with connected(daemon.uri) as nbd:
            nbd.flush()
    except Exception as exc:
        return str(exc), time.monotonic() - started
    return None, time.monotonic() - started


def fill(daemon: RunningDaemon, total: int) -> list[tuple[int, bytes]]:
    """Write incompressible data until the store refuses; what was acknowledged."""
    acked: list[tuple[int, bytes]] = []
    rng = random.Random(7)
    with contextlib.suppress(Exception), connected(daemon.uri) as nbd:
        for offset in range(0, total, MiB):
            data = rng.randbytes(MiB)
            nbd.pwrite(data, offset)
            acked.append((offset, data))
    return acked


def wait_for_flush(daemon: RunningDaemon, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while (error := flush_outcome(daemon)[0]) is not None:
        assert time.monotonic() < deadline, f"no recovery: {error}\n{daemon.log()[-3000:]}"
        time.sleep(0.5)


def test_full_disk_gives_eio_in_bounded_time_then_recovers(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "24m") as mount:
        daemon = daemon_factory("-c", str(config(tmp_path)), storage_url=f"file://{mount}/d")
        acked = fill(daemon, 48 * MiB)
        error, took = flush_outcome(daemon)
        assert error is not None and "Input/output error" in error, error
        assert took < 10 * TIMEOUT_MS / 1000, f"FLUSH took {took:.1f}s to fail"
        assert "storage full" in daemon.log()
        assert "storage full" in daemon.status()["stats"]["storage_state"]
        run("mount", "-o", "remount,size=512m", str(mount))
        wait_for_flush(daemon)
        assert daemon.status()["stats"]["storage_state"] == "ok"
        assert "answers again" in daemon.log()
        with connected(daemon.uri) as nbd:
            for offset, data in acked:
                assert nbd.pread(len(data), offset) == data, f"acknowledged write at {offset}"
        assert daemon.stop() == 0


def test_shutdown_on_a_full_disk_ends_and_says_so(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "24m") as mount:
        daemon = daemon_factory("-c", str(config(tmp_path)), storage_url=f"file://{mount}/d")
        fill(daemon, 48 * MiB)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(120)
        assert time.monotonic() - started < 60
        assert code == 1
        assert "final flush failed" in daemon.log()


def test_read_only_store_gives_eio_then_recovers(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    store = tmp_path / "ro"
    store.mkdir()
    daemon = daemon_factory("-c", str(config(tmp_path)), storage_url=f"file://{store}")
    run("mount", "--bind", str(store), str(store))
    try:
        run("mount", "-o", "remount,bind,ro", str(store))
        with connected(daemon.uri) as nbd:
            nbd.pwrite(b"x" * 65536, 0)
        error, took = flush_outcome(daemon)
        assert error is not None and "Input/output error" in error, error
        assert took < 10 * TIMEOUT_MS / 1000
        assert "read-only" in daemon.status()["stats"]["storage_state"]
        run("mount", "-o", "remount,bind,rw", str(store))
        wait_for_flush(daemon)
    finally:
        quiet("umount", "-l", str(store), timeout=30)
    with connected(daemon.uri) as nbd:
        assert nbd.pread(65536, 0) == b"x" * 65536
    assert daemon.stop() == 0


def test_deleted_storage_directory_fails_flush_and_shutdown(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    store = tmp_path / "doomed"
    daemon = daemon_factory(storage_url=f"file://{store}")
    with connected(daemon.uri) as nbd:
        nbd.pwrite(b"a" * 65536, 0)
        nbd.flush()
    run("rm", "-rf", str(store))
    with connected(daemon.uri) as nbd:
        nbd.pwrite(b"b" * 65536, 65536)
    error, _ = flush_outcome(daemon)
    assert error is not None and "Input/output error" in error
    assert "was removed" in daemon.log()
    assert "was removed" in daemon.status()["stats"]["storage_state"]
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 1
    assert "final flush failed" in daemon.log()
