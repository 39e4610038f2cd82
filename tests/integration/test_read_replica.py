"""`--read-only` as a read replica beside a writing daemon: never fences it, never writes."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import DaemonFactory
from tests.support import BIN, RunningDaemon, connected, run_portalbd

BLOCK = 64 * 1024


def storage_files(root: Path) -> dict[str, int]:
    """Every object under the storage directory with its size (what a write would change)."""
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def read_until(replica: RunningDaemon, expected: bytes, offset: int, timeout: float) -> float:
    """Seconds until the replica serves ``expected`` (fails after ``timeout``)."""
    started = time.monotonic()
    while True:
        with connected(replica.uri) as handle:
            got = handle.pread(len(expected), offset)
        if got == expected:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"replica still serves {got[:16]!r}"
        time.sleep(0.1)


def test_replica_follows_the_writer_without_fencing_it(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/data"
    writer = daemon_factory(storage_url=url, instance="writer")
    first, second = os.urandom(BLOCK), os.urandom(BLOCK)
    with connected(writer.uri) as w:
        w.pwrite(first, 0)
        w.flush()
    writer.control({"SnapshotCreate": {"name": "s1"}})
    replica = daemon_factory("--read-only", storage_url=url, instance="replica", disk_size_gb=None)

    status = replica.status()
    assert status["read_only"] is True
    info = status["replica"]
    assert (info["mode"], info["snapshot"], info["generation"]) == ("follow", None, 1)
    lag = (info["lag_bound_ms"] + 2000) / 1000
    shown = subprocess.run(
        [str(BIN / "portalctl"), "status", "-s", str(replica.control_socket)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    line = next(ln for ln in shown.splitlines() if ln.strip().startswith("Replica:"))
    assert re.search(r"Replica: +read-only, following the writer \(lag under \d+ ms\)$", line)
    with connected(replica.uri) as r:
        assert r.is_read_only() and r.pread(BLOCK, 0) == first

    # The writer keeps writing and flushing: it was not fenced.
    with connected(writer.uri) as w:
        w.pwrite(second, BLOCK)
        w.flush()
    assert read_until(replica, second, BLOCK, lag) < lag
    assert writer.status()["stats"]["storage_state"] == "ok"
    assert "fenced" not in writer.log()

    # What would write is refused, with the reason.
    for request, what in (
        ({"SnapshotCreate": {"name": "x"}}, "taking a snapshot"),
        ({"SnapshotDelete": {"name": "s1"}}, "deleting a snapshot"),
        ({"SnapshotRestore": {"name": "s1", "force": True}}, "a restore"),
    ):
        assert replica.control(request) == {
            "Error": "this daemon is a read-only replica (--read-only): "
            f"{what} is done by the writer"
        }
    assert [s["name"] for s in replica.control("SnapshotList")["SnapshotList"]] == ["s1"]

    # A restore on the writer makes a new live generation: the replica follows.
    assert writer.control({"SnapshotRestore": {"name": "s1"}}) == "Ok"
    assert read_until(replica, bytes(BLOCK), BLOCK, lag) < lag
    assert replica.status()["replica"]["generation"] == 2
    assert replica.stop() == 0
    assert writer.stop() == 0


def test_replica_of_a_snapshot_writes_nothing(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/data"
    writer = daemon_factory(storage_url=url, instance="writer")
    before, after = os.urandom(BLOCK), os.urandom(BLOCK)
    with connected(writer.uri) as w:
        w.pwrite(before, 0)
        w.flush()
        writer.control({"SnapshotCreate": {"name": "s1"}})
        w.pwrite(after, 0)
        w.flush()
    assert writer.stop() == 0
    files = storage_files(tmp_path / "data")

    replica = daemon_factory(
        "--read-only", "--snapshot", "s1", storage_url=url, instance="snap", disk_size_gb=None
    )
    info = replica.status()["replica"]
    assert (info["mode"], info["snapshot"], info["lag_bound_ms"]) == ("snapshot", "s1", None)
    with connected(replica.uri) as r:
        assert r.pread(BLOCK, 0) == before
        r.flush()  # accepted: nothing to make durable
    assert replica.status()["replica"]["last_error"] is None
    assert replica.stop() == 0
    assert storage_files(tmp_path / "data") == files  # not one object written

    # the live disk, read-only, after the writer stopped
    live = daemon_factory("--read-only", storage_url=url, instance="live", disk_size_gb=None)
    with connected(live.uri) as r:
        assert r.pread(BLOCK, 0) == after
    assert live.stop() == 0
    assert storage_files(tmp_path / "data") == files


def startup_error(tmp_path: Path, *args: str) -> str:
    result = run_portalbd(
        "--socket", str(tmp_path / "probe.sock"), "--nbd-address", "127.0.0.1:0", *args
    )
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    return result.stderr


def test_replica_refusals(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    message = startup_error(tmp_path, "--read-only")
    assert "memory:// storage belongs to one process and cannot be shared" in message
    empty = f"file://{tmp_path}/empty"
    message = startup_error(tmp_path, "--read-only", "--storage-url", empty)
    assert f"no portalbd disk at {empty} (no catalog); a read-only replica never creates" in message
    assert not (tmp_path / "empty" / "catalog").exists()

    url = f"file://{tmp_path}/data"
    writer = daemon_factory(storage_url=url, instance="writer")
    writer.control({"SnapshotCreate": {"name": "s1"}})
    message = startup_error(tmp_path, "--read-only", "--snapshot", "nope", "--storage-url", url)
    assert "no snapshot 'nope' to serve (snapshots: s1)" in message

    # the writer deletes the snapshot a replica serves: the replica says so
    replica = daemon_factory(
        "--read-only", "--snapshot", "s1", storage_url=url, instance="snap", disk_size_gb=None
    )
    assert writer.control({"SnapshotDelete": {"name": "s1"}}) == "Ok"
    deadline = time.monotonic() + 10
    while (error := replica.status()["replica"]["last_error"]) is None:
        assert time.monotonic() < deadline, "the replica never noticed"
        time.sleep(0.1)
    assert (
        error
        == "snapshot 's1' was deleted by the writer; reads may fail once its files are collected"
    )
