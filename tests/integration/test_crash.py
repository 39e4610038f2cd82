"""SIGKILL the daemon at seeded random moments, restart it, check the disk.

Writers on two connections write 64 KiB regions (one device block each) and
flush now and then; the daemon is killed during that load, right as a FLUSH
is sent, during a snapshot and during a restore. After each restart every
region must hold its last flushed value or a later acknowledged (or the
in-flight) one; a snapshot that the catalog lists must hold exactly what the
disk held when it was taken; a restore cut short leaves the old disk or the
snapshot, whole, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, nbd_handle
from tests.support.reliability import REGION, Budget, RegionModel, digest, pattern

pytestmark = pytest.mark.timeout(600)

SEED = int(os.environ.get("PORTALBD_CRASH_SEED", "9"))
REGIONS = 96
SIZE = REGIONS * REGION
WORKERS = 2


class Writer(threading.Thread):
    """Writes its own regions (region % WORKERS == index), flushing now and then."""

    def __init__(self, uri: str, index: int, model: RegionModel, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.index = index
        self.model = model
        self.rng = random.Random(rng.random())
        self.seq = rng.randrange(1 << 30)
        self.stop = threading.Event()
        self.writes = 0
        self.flushes = 0
        self.error: BaseException | None = None
        self.mine = [r for r in range(REGIONS) if r % WORKERS == index]

    def run(self) -> None:
        try:
            nbd = nbd_handle(self.uri)
        except Exception as exc:  # killed before we connected
            self.error = exc
            return
        try:
            while not self.stop.is_set():
                if self.rng.random() < 0.1:
                    mark = self.model.flush_issued(self.mine)
                    nbd.flush()
                    self.model.flush_acked(mark)
                    self.flushes += 1
                    continue
                region = self.rng.choice(self.mine)
                self.seq += 1
                data = pattern(SEED, region, self.seq)
                value = digest(data)
                self.model.begin_write(region, value)
                fua = self.rng.random() < 0.1
                nbd.pwrite(data, region * REGION, 1 if fua else 0)  # LIBNBD_CMD_FLAG_FUA
                if fua:
                    self.model.durable(region, value)
                else:
                    self.model.acked(region, value)
                self.writes += 1
        except Exception as exc:  # the daemon died under us: expected
            self.error = exc
        finally:
            with contextlib.suppress(Exception):
                nbd.shutdown()


def read_regions(daemon: RunningDaemon) -> list[bytes]:
    nbd = nbd_handle(daemon.uri)
    try:
        return [digest(nbd.pread(REGION, r * REGION)) for r in range(REGIONS)]
    finally:
        with contextlib.suppress(Exception):
            nbd.shutdown()


def check(model: RegionModel, observed: list[bytes], what: str) -> None:
    bad = [r for r in range(REGIONS) if observed[r] not in model.allowed(r)]
    assert not bad, f"{what}: regions {bad[:10]} hold values they never durably had (seed {SEED})"
    model.adopt(observed)


class Harness:
    def __init__(self, factory: DaemonFactory, workdir: Path) -> None:
        self.factory = factory
        self.workdir = workdir
        self.url = f"file://{workdir}/data"
        self.rng = random.Random(SEED)
        self.model = RegionModel(REGIONS)
        self.snapshots: dict[str, list[bytes]] = {}
        self.counter = 0
        self.kills = 0
        self.writes = 0
        self.daemon = self.start()

    def start(self) -> RunningDaemon:
        return self.factory(
            f"--size-bytes={SIZE}",
            "--cache-bytes",
            str(4 << 20),
            storage_url=self.url,
            workdir=self.workdir,
        )

    def kill_and_restart(self) -> None:
        self.daemon.kill()
        self.kills += 1
        self.daemon = self.start()

    def writers(self) -> list[Writer]:
        workers = [Writer(self.daemon.uri, i, self.model, self.rng) for i in range(WORKERS)]
        for worker in workers:
            worker.start()
        return workers

    def quiesce(self) -> None:
        """No I/O in flight, everything flushed: the model is exact."""
        nbd = nbd_handle(self.daemon.uri)
        try:
            nbd.flush()
        finally:
            nbd.shutdown()
        self.model.settle()

    def control_async(self, request: Any) -> threading.Thread:
        def call() -> None:
            with contextlib.suppress(Exception):
                self.daemon.control(request, timeout=30)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread

    # --- scenarios ---------------------------------------------------------

    def under_load(self) -> None:
        workers = self.writers()
        time.sleep(self.rng.uniform(0.05, 0.6))
        self.kill_and_restart()
        for worker in workers:
            worker.join(30)
            self.writes += worker.writes
        check(self.model, read_regions(self.daemon), "kill under write load")

    def during_flush(self) -> None:
        workers = self.writers()
        time.sleep(self.rng.uniform(0.05, 0.3))
        nbd = nbd_handle(self.daemon.uri)
        mark = self.model.flush_issued(list(range(REGIONS)))
        done = threading.Event()

        def flush() -> None:
            with contextlib.suppress(Exception):
                nbd.flush()
                done.set()

        thread = threading.Thread(target=flush, daemon=True)
        thread.start()
        time.sleep(self.rng.choice([0, 0.0005, 0.002, 0.01]))
        self.kill_and_restart()
        thread.join(30)
        for worker in workers:
            worker.join(30)
        if done.is_set():
            # Acknowledged before the kill: at least the marked state survived.
            self.model.flush_acked(mark)
        check(self.model, read_regions(self.daemon), "kill during flush")

    def during_snapshot(self) -> None:
        workers = self.writers()
        time.sleep(self.rng.uniform(0.05, 0.3))
        for worker in workers:
            worker.stop.set()
            worker.join(30)
        self.quiesce()
        self.counter += 1
        name = f"c{self.counter}"
        content = [self.model.current(r) for r in range(REGIONS)]
        self.control_async({"SnapshotCreate": {"name": name}})
        time.sleep(self.rng.choice([0, 0.001, 0.005, 0.02, 0.1]))
        self.kill_and_restart()
        check(self.model, read_regions(self.daemon), "kill during snapshot")
        listed = {s["name"] for s in self.daemon.control("SnapshotList")["SnapshotList"]}
        assert listed >= set(self.snapshots), "a completed snapshot was lost"
        if name in listed:
            self.snapshots[name] = content

    def during_restore(self) -> None:
        if not self.snapshots:
            self.during_snapshot()
            return
        name = self.rng.choice(sorted(self.snapshots))
        self.quiesce()
        before = [self.model.current(r) for r in range(REGIONS)]
        self.control_async({"SnapshotRestore": {"name": name, "force": True}})
        time.sleep(self.rng.choice([0, 0.002, 0.01, 0.05, 0.2]))
        self.kill_and_restart()
        observed = read_regions(self.daemon)
        assert observed in (before, self.snapshots[name]), (
            f"after a kill during restore of {name} the disk is neither the old disk "
            f"nor the snapshot (seed {SEED})"
        )
        self.model.adopt(observed)

    def verify_snapshots(self) -> None:
        """Restore every snapshot the catalog kept and compare (no kill)."""
        for name, content in sorted(self.snapshots.items()):
            response = self.daemon.control({"SnapshotRestore": {"name": name, "force": True}})
            assert response == "Ok", response
            assert read_regions(self.daemon) == content, f"snapshot {name} content differs"


def test_sigkill_under_load_flush_snapshot_restore(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    harness = Harness(daemon_factory, tmp_path)
    scenarios = [
        harness.under_load,
        harness.during_flush,
        harness.during_snapshot,
        harness.during_restore,
    ]
    budget = Budget(cycles=8)
    while budget.more():
        scenarios[(budget.done - 1) % len(scenarios)]()
    harness.verify_snapshots()
    assert harness.kills >= 8
    print(
        f"crash test seed={SEED}: {harness.kills} kills survived, {harness.writes} writes "
        f"under load, {harness.kills * SIZE} bytes verified after restarts, "
        f"{len(harness.snapshots)} snapshots verified"
    )
