"""Snapshots and restore against a real daemon on file storage, through libnbd.

Every check reads the disk back through NBD and compares it with what the
test wrote; the storage directory is inspected for the generations a
restore leaves behind.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from portalbd.control.errors import ConnectionLost
from portalbd.faults import EXIT_CODE
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected

MiB = 1 << 20
BLOCK = 64 * 1024
SIZE = 16 * MiB


def fill(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def disk_digest(daemon: RunningDaemon) -> list[str]:
    """One hash per MiB of the whole disk."""
    with connected(daemon.uri) as handle:
        return [hashlib.sha256(handle.pread(MiB, off)).hexdigest() for off in range(0, SIZE, MiB)]


def write_a(daemon: RunningDaemon) -> None:
    """Pattern A: every byte of the disk."""
    with connected(daemon.uri) as handle:
        for off in range(0, SIZE, MiB):
            handle.pwrite(fill(off, MiB), off)
        handle.flush()


def write_b(daemon: RunningDaemon) -> None:
    """Pattern B: overwrite some, unaligned pieces, a trim and a zeroed range."""
    with connected(daemon.uri) as handle:
        handle.pwrite(fill(1001, 3 * MiB), 2 * MiB)
        handle.pwrite(b"unaligned" * 1000, 5 * MiB - 4321)
        handle.pwrite(fill(1002, BLOCK), SIZE - BLOCK)
        handle.trim(MiB, 8 * MiB)
        handle.zero(BLOCK * 3, 10 * MiB + 100)
        handle.flush()


def names(daemon: RunningDaemon) -> list[str]:
    return [s["name"] for s in daemon.control("SnapshotList")["SnapshotList"]]


def restore(daemon: RunningDaemon, name: str, force: bool = False) -> Any:
    return daemon.control({"SnapshotRestore": {"name": name, "force": force}})


def generation_dirs(storage: Path) -> dict[int, int]:
    """Generation number -> number of files under it (empty dirs do not count)."""
    gens: dict[int, int] = {}
    base = storage / "gen"
    if base.is_dir():
        for path in base.iterdir():
            files = sum(1 for p in path.rglob("*") if p.is_file())
            if files:
                gens[int(path.name)] = files
    return gens


def catalog(daemon: RunningDaemon) -> dict[str, Any]:
    status = daemon.status()
    return {"live": status["generation"], "snapshots": status["snapshot_count"]}


def file_daemon_at(factory: DaemonFactory, storage: Path, **kwargs: Any) -> RunningDaemon:
    daemon = factory(f"--size-bytes={SIZE}", storage_url=f"file://{storage}", **kwargs)
    wait_idle(daemon)
    return daemon


def wait_idle(daemon: RunningDaemon) -> None:
    """Wait until the readiness probe of start_daemon is no longer counted as a client."""
    deadline = time.monotonic() + 15
    while daemon.status()["stats"]["connections"] and time.monotonic() < deadline:
        time.sleep(0.02)


def test_write_snapshot_restore_cycle(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    storage = tmp_path / "data"
    daemon = file_daemon_at(daemon_factory, storage)
    write_a(daemon)
    state_a = disk_digest(daemon)
    s1 = daemon.control({"SnapshotCreate": {"name": "s1"}})["Snapshot"]
    write_b(daemon)
    state_b = disk_digest(daemon)
    assert state_a != state_b
    daemon.control({"SnapshotCreate": {"name": "s2"}})
    assert names(daemon) == ["s1", "s2"]

    assert restore(daemon, "s1") == "Ok"
    assert disk_digest(daemon) == state_a
    assert names(daemon) == ["s1", "s2"]
    assert restore(daemon, "s2") == "Ok"
    assert disk_digest(daemon) == state_b
    assert names(daemon) == ["s1", "s2"]

    # A restored disk is writable and its snapshots are independent of it.
    assert restore(daemon, "s1") == "Ok"
    with connected(daemon.uri) as handle:
        handle.pwrite(b"\xee" * BLOCK, 0)
        handle.flush()
    assert restore(daemon, "s1") == "Ok"
    assert disk_digest(daemon) == state_a

    assert daemon.control({"SnapshotDelete": {"name": "s1"}}) == "Ok"
    assert names(daemon) == ["s2"]
    assert restore(daemon, "s2") == "Ok"
    assert disk_digest(daemon) == state_b
    assert restore(daemon, "s1") == {"Error": "snapshot 's1' not found"}

    # Everything survives a clean restart.
    daemon.stop()
    daemon = file_daemon_at(daemon_factory, storage)
    assert names(daemon) == ["s2"]
    assert disk_digest(daemon) == state_b
    with connected(daemon.uri) as handle:
        handle.pwrite(b"\x11" * MiB, 0)
        handle.flush()
    assert restore(daemon, "s2") == "Ok"
    assert disk_digest(daemon) == state_b
    assert s1["generation"] == 1


def test_snapshot_metadata(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = file_daemon_at(daemon_factory, tmp_path / "data")
    before = int(time.time())
    first = daemon.control({"SnapshotCreate": {"name": "first"}})["Snapshot"]
    with connected(daemon.uri) as handle:
        handle.pwrite(b"z" * MiB, 0)
    second = daemon.control({"SnapshotCreate": {"name": "second"}})["Snapshot"]
    assert first["id"] != second["id"]
    assert before - 1 <= first["created_at"] <= second["created_at"] <= int(time.time()) + 1
    assert (first["size_bytes"], second["size_bytes"]) == (0, MiB)
    assert daemon.control({"SnapshotGet": {"name": "second"}}) == {"Snapshot": second}
    assert daemon.status()["snapshot_count"] == 2


def test_restore_pauses_attached_clients_then_forced_disconnects(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Without force the clients stay attached (I/O paused for the swap, as the
    original's write lock does) and read the snapshot on the same connection;
    --force still sends them away."""
    daemon = file_daemon_at(daemon_factory, tmp_path / "data")
    write_a(daemon)
    state_a = disk_digest(daemon)
    daemon.control({"SnapshotCreate": {"name": "s1"}})
    write_b(daemon)
    with connected(daemon.uri) as one, connected(daemon.uri) as two:
        assert two.pread(BLOCK, 2 * MiB) == fill(1001, 3 * MiB)[:BLOCK]  # B, cached
        assert restore(daemon, "s1") == "Ok"
        digest = [hashlib.sha256(two.pread(MiB, off)).hexdigest() for off in range(0, SIZE, MiB)]
        assert digest == state_a
        one.pwrite(b"\x42" * BLOCK, 0)
        assert two.pread(BLOCK, 0) == b"\x42" * BLOCK
        last = daemon.status()["last_restore"]
        assert (last["name"], last["paused"], last["disconnected"]) == ("s1", 2, 0)
        assert "restore paused I/O of 2 clients for " in daemon.log()
        assert restore(daemon, "s1", force=True) == "Ok"
        for handle in (one, two):
            with pytest.raises(Exception):  # noqa: B017 - libnbd raises nbd.Error
                handle.pread(BLOCK, 0)
    last = daemon.status()["last_restore"]
    assert (last["paused"], last["disconnected"]) == (0, 2)
    assert daemon.status()["stats"]["connections"] == 0
    assert disk_digest(daemon) == state_a


def test_requests_in_flight_through_a_restore(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A client keeps 32 requests in flight while a restore runs: every one is
    answered, reads with the old data or the snapshot's, never an error."""
    import nbd

    daemon = file_daemon_at(daemon_factory, tmp_path / "data")
    reads_at, writes_at = range(0, 4 * MiB, BLOCK), range(8 * MiB, 12 * MiB, BLOCK)
    snap, live = fill(1, 4 * MiB), fill(2, 4 * MiB)
    with connected(daemon.uri) as handle:
        handle.pwrite(snap, 0)
        handle.flush()
        daemon.control({"SnapshotCreate": {"name": "s"}})
        handle.pwrite(live, 0)
        handle.flush()
    reply: dict[str, Any] = {}
    restorer = threading.Thread(target=lambda: reply.update(r=restore(daemon, "s")))
    # cookie -> (issued while the restore ran or before, offset, read buffer or payload)
    pending: dict[int, tuple[bool, int, Any]] = {}
    reads: list[tuple[bool, int, bytes]] = []
    written: dict[int, list[bytes]] = {}
    last_write_after: dict[int, bytes] = {}
    issued = after = 0
    with connected(daemon.uri) as h:
        while after < 200 or pending:
            if restorer.ident is None and issued == 100:
                restorer.start()
            done = restorer.ident is not None and not restorer.is_alive()
            while len(pending) < 32 and after < 200:
                if issued % 2:
                    offset = reads_at[issued // 2 % len(reads_at)]
                    buf = nbd.Buffer(BLOCK)
                    pending[h.aio_pread(buf, offset)] = (not done, offset, buf)
                else:
                    offset = writes_at[issued // 2 % len(writes_at)]
                    data = random.Random(issued).randbytes(BLOCK)
                    pending[h.aio_pwrite(data, offset)] = (not done, offset, data)
                    written.setdefault(offset, []).append(data)
                    if done:
                        last_write_after[offset] = data
                    else:
                        last_write_after.pop(offset, None)
                issued += 1
                after += done
            h.poll(100)
            for cookie in [c for c in pending if h.aio_command_completed(c)]:
                early, offset, what = pending.pop(cookie)
                if isinstance(what, nbd.Buffer):
                    reads.append((early, offset, bytes(what.to_bytearray())))
        restorer.join(30)
        assert reply == {"r": "Ok"}
        last = daemon.status()["last_restore"]
        assert (last["paused"], last["disconnected"]) == (1, 0)
        for early, offset, data in reads:
            allowed = [snap[offset : offset + BLOCK]]
            if early:
                allowed.append(live[offset : offset + BLOCK])
            assert data in allowed, f"read at {offset} (early={early}) has other data"
        early_new = sum(early and data == snap[o : o + BLOCK] for early, o, data in reads)
        early_old = sum(early and data == live[o : o + BLOCK] for early, o, data in reads)
        print(f"reads: {early_old} old, {early_new} sent during the restore and answered new")
        assert early_old and early_new, "no request was in flight across the swap"
        assert any(not early for early, _, _ in reads)
        for offset, versions in written.items():
            data = h.pread(BLOCK, offset)
            if offset in last_write_after:
                assert data == last_write_after[offset], offset
            else:
                assert data == bytes(BLOCK) or data in versions, offset


def test_old_generations_are_collected(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    storage = tmp_path / "data"
    daemon = file_daemon_at(daemon_factory, storage)
    with connected(daemon.uri) as handle:
        handle.pwrite(b"1" * MiB, 0)
        handle.flush()
    daemon.control({"SnapshotCreate": {"name": "s1"}})  # in generation 1
    assert restore(daemon, "s1") == "Ok"  # live: generation 2 (a clone of 1)
    with connected(daemon.uri) as handle:
        handle.pwrite(b"2" * MiB, 0)
        handle.flush()
    daemon.control({"SnapshotCreate": {"name": "s2"}})  # in generation 2
    assert restore(daemon, "s1") == "Ok"  # live: generation 3; 2 is kept for s2
    assert daemon.status()["generation"] == 3
    assert set(generation_dirs(storage)) == {1, 2, 3}
    assert daemon.control({"SnapshotDelete": {"name": "s2"}}) == "Ok"
    # Nothing refers to generation 2 any more; 1 is the parent of the live 3.
    assert set(generation_dirs(storage)) == {1, 3}
    assert restore(daemon, "s1") == "Ok"
    # 3 was live and had no snapshot: gone once 4 took over.
    assert set(generation_dirs(storage)) == {1, 4}
    with connected(daemon.uri) as handle:
        assert handle.pread(MiB, 0) == b"1" * MiB


# --- a snapshot under concurrent writes ----------------------------------------


class Recorder(threading.Thread):
    """Writes versions into its own blocks and logs when each was sent and acknowledged.

    Events are stamped from one shared counter, so "acknowledged before the
    snapshot request was sent" is an exact comparison, not a timing guess.
    """

    clock = 0
    lock = threading.Lock()

    @classmethod
    def tick(cls) -> int:
        with cls.lock:
            cls.clock += 1
            return cls.clock

    def __init__(self, uri: str, blocks: list[int], seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.blocks = blocks
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        # block -> [(version, sent_at, acked_at)]
        self.log: dict[int, list[tuple[int, int, int]]] = {b: [(0, 0, 0)] for b in blocks}
        self.error: BaseException | None = None

    @staticmethod
    def payload(block: int, version: int) -> bytes:
        head = f"block={block} version={version}\n".encode()
        return head + bytes(BLOCK - len(head))

    def run(self) -> None:
        version = 0
        try:
            with connected(self.uri) as handle:
                while not self.stop.is_set():
                    block = self.rng.choice(self.blocks)
                    version += 1
                    sent = self.tick()
                    handle.pwrite(self.payload(block, version), block * BLOCK)
                    self.log[block].append((version, sent, self.tick()))
        except BaseException as exc:
            self.error = exc

    def allowed(self, block: int, request_sent: int, reply_at: int) -> set[int]:
        """Versions the snapshot may hold for a block.

        At least the newest acknowledged before the request was sent; at
        most any sent before the reply arrived (those raced the snapshot).
        """
        entries = self.log[block]
        floor = max(v for v, _, acked in entries if acked < request_sent)
        return {v for v, sent, _ in entries if v >= floor and sent < reply_at}


def fio_load(uri: str, seconds: int) -> subprocess.Popen[bytes]:
    """Random writes over the first half of the disk, to keep the daemon busy."""
    return subprocess.Popen(
        [
            "fio",
            "--name=load",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            "--bs=4k,64k",
            f"--size={SIZE // 2}",
            "--iodepth=16",
            "--numjobs=2",
            "--time_based",
            f"--runtime={seconds}",
            "--output-format=json",
            # fio saves a verify state file in its cwd when stopped by a signal
            "--verify_state_save=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_snapshot_under_concurrent_writes(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = file_daemon_at(daemon_factory, tmp_path / "data")
    first = SIZE // 2 // BLOCK
    blocks = list(range(first, SIZE // BLOCK))
    writers = [Recorder(daemon.uri, blocks[i::3], seed=i) for i in range(3)]
    fio = fio_load(daemon.uri, seconds=30)
    try:
        for writer in writers:
            writer.start()
        windows: list[tuple[str, int, int]] = []
        for i in range(4):
            time.sleep(0.4)
            name = f"live{i}"
            sent = Recorder.tick()
            reply = daemon.control({"SnapshotCreate": {"name": name}})
            done = Recorder.tick()
            assert "Snapshot" in reply, reply
            windows.append((name, sent, done))
        for writer in writers:
            writer.stop.set()
            writer.join(30)
            assert writer.error is None, writer.error
        recorded = sum(len(entries) - 1 for w in writers for entries in w.log.values())
        fio_writes = daemon.status()["stats"]["commands"]["write"] - recorded
        assert fio.poll() is None, fio.communicate()[1].decode()
        assert fio_writes > 100, "fio did not load the daemon"
    finally:
        fio.terminate()
        fio.wait(30)
    owner = {b: w for w in writers for b in w.blocks}
    checked = 0
    raced = 0
    for name, sent, done in windows:
        assert restore(daemon, name, force=True) == "Ok"
        with connected(daemon.uri) as handle:
            for block in blocks:
                data = handle.pread(BLOCK, block * BLOCK)
                writer = owner[block]
                allowed = writer.allowed(block, sent, done)
                if data == bytes(BLOCK):
                    version = 0
                else:
                    head = data.split(b"\n", 1)[0].decode()
                    assert head.startswith(f"block={block} version="), head
                    version = int(head.rsplit("=", 1)[1])
                    assert data == Recorder.payload(block, version), "torn block"
                assert version in allowed, (
                    f"snapshot {name}: block {block} holds version {version}, "
                    f"allowed {sorted(allowed)}"
                )
                raced += len(allowed) > 1
                checked += 1
    total_writes = sum(len(entries) - 1 for w in writers for entries in w.log.values())
    assert total_writes > 100, "the writers barely ran; the test proved nothing"
    print(
        f"checked {checked} blocks in 4 snapshots; {total_writes} recorded writes, "
        f"{fio_writes} fio writes; {raced} blocks raced the snapshot"
    )


# --- crashes in the middle of a restore -------------------------------------------

# Crash point -> the state the disk must come back in.
CRASH_POINTS = {
    "restore:after-reserve": "old",
    "restore:after-clone": "old",
    "restore:before-commit": "old",
    "restore:after-commit": "new",
    "restore:after-swap": "new",
    "gc:after-delete": "new",
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_crash_during_restore(daemon_factory: DaemonFactory, tmp_path: Path, point: str) -> None:
    """Kill the daemon at one step of a restore; it comes back old or new, whole.

    Setup (no fault): write X, snapshot a, write Y, snapshot b, restore b.
    The live generation (2) then holds Y and nothing else refers to it, so
    the faulty restore of a also has garbage to collect.
    """
    storage = tmp_path / "data"
    no_fault = {"PORTALBD_FAULT": ""}
    daemon = file_daemon_at(daemon_factory, storage, env=no_fault)
    with connected(daemon.uri) as handle:
        handle.pwrite(fill(1, 4 * MiB), 0)
        handle.flush()
    new = disk_digest(daemon)
    daemon.control({"SnapshotCreate": {"name": "a"}})
    with connected(daemon.uri) as handle:
        handle.pwrite(fill(2, 3 * MiB), MiB)
        handle.trim(MiB, 12 * MiB)
        handle.flush()
    old = disk_digest(daemon)
    daemon.control({"SnapshotCreate": {"name": "b"}})
    assert restore(daemon, "b") == "Ok"
    assert daemon.status()["generation"] == 2
    daemon.stop()

    daemon = file_daemon_at(daemon_factory, storage, env={"PORTALBD_FAULT": point})
    with pytest.raises(ConnectionLost):  # the daemon died with the request open
        answer = restore(daemon, "a")
        pytest.fail(f"restore answered {answer} instead of crashing at {point}")
    assert daemon.process.wait(30) == EXIT_CODE
    assert f"PORTALBD_FAULT crash at {point}" in daemon.log()

    daemon = file_daemon_at(daemon_factory, storage, env=no_fault)
    observed = disk_digest(daemon)
    assert observed in (old, new), f"crash at {point}: the disk is neither old nor new"
    expected = CRASH_POINTS[point]
    assert observed == (old if expected == "old" else new), f"expected the {expected} disk"
    assert names(daemon) == ["a", "b"]
    assert (daemon.status()["generation"] == 2) == (expected == "old")
    # Nothing unreferenced is left on storage once the daemon is back: only
    # the live generation and generation 1 (both snapshots, parent of all).
    assert set(generation_dirs(storage)) == {1, daemon.status()["generation"]}
    # Both snapshots still restore to what they held, and collect cleanly.
    assert restore(daemon, "b") == "Ok"
    assert disk_digest(daemon) == old
    assert restore(daemon, "a") == "Ok"
    assert disk_digest(daemon) == new
    assert set(generation_dirs(storage)) == {1, daemon.status()["generation"]}


def test_generation_that_cannot_be_deleted_is_retried(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Regression: a failed deletion used to drop the generation from the catalog anyway.

    Its objects then stayed on storage for good, and the log claimed they
    were removed. Now it stays listed and the next collection retries it.
    """
    storage = tmp_path / "data"
    no_fault = {"PORTALBD_FAULT": ""}
    daemon = file_daemon_at(daemon_factory, storage, env=no_fault)
    with connected(daemon.uri) as handle:
        handle.pwrite(b"g" * MiB, 0)
        handle.flush()
    daemon.control({"SnapshotCreate": {"name": "a"}})
    daemon.stop()
    daemon = file_daemon_at(daemon_factory, storage, env={"PORTALBD_FAULT": "restore:after-clone"})
    with pytest.raises(ConnectionLost):  # the daemon died with the request open
        restore(daemon, "a")
    assert daemon.process.wait(30) == EXIT_CODE
    orphan = storage / "gen" / "00000002"
    assert 2 in generation_dirs(storage)
    # Objects without a manifest: SlateDB refuses to delete such a path.
    shutil.rmtree(orphan / "manifest")
    (orphan / "stray").write_bytes(b"left by someone")

    daemon = file_daemon_at(daemon_factory, storage, env=no_fault)
    log = daemon.log()
    assert "cannot delete unreferenced generation 2 yet" in log
    assert "removed unreferenced generations" not in log
    daemon.stop()

    (orphan / "stray").unlink()  # the obstacle is gone
    daemon = file_daemon_at(daemon_factory, storage, env=no_fault)
    assert "removed unreferenced generations [2]" in daemon.log()
    assert set(generation_dirs(storage)) == {1}
    with connected(daemon.uri) as handle:
        assert handle.pread(MiB, 0) == b"g" * MiB
