"""Scheduled snapshots with retention: a clock the test drives, then a real daemon.

The first tests run the scheduler against a real instance (memory storage,
in process) with an injected clock and sleep, so a day of 15-minute slots
takes milliseconds. The last one runs the daemon with ``every = "1s"``.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from portalbd.config import Config
from portalbd.instance import Instance
from portalbd.retention import RetentionPolicy, is_scheduled
from portalbd.snapshot_schedule import Schedule, SnapshotScheduler
from tests.conftest import DaemonFactory
from tests.integration.test_portalctl import ctl, sock

START = calendar.timegm((2026, 12, 2, 3, 7, 13))  # 03:07:13 UTC: the first slot is 03:15


class Clock:
    """Wall time that moves only when the test lets the scheduler's sleep end."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self._wake: asyncio.Queue[None] = asyncio.Queue()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self._wake.get()
        self.now += seconds

    def release(self) -> None:
        """Let the pending sleep end."""
        self._wake.put_nowait(None)

    async def next_slot(self) -> None:
        """Let the pending sleep end and wait until the scheduler sleeps again."""
        waiting = len(self.sleeps)
        self.release()
        for _ in range(1000):
            if len(self.sleeps) > waiting:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the scheduler did not come back to sleep")


async def with_instance(
    body: Callable[[Instance], Awaitable[None]], config: Config | None = None
) -> None:
    config = config or Config()
    config.device.size_bytes = 16 << 20
    instance = Instance(config, Path("/nonexistent/schedule-test.sock"))
    await instance.open()
    try:
        await body(instance)
    finally:
        await instance.close()


async def started_scheduler(instance: Instance, keep: int) -> tuple[SnapshotScheduler, Clock]:
    """A 15-minute schedule keeping ``keep``, on a test clock, started and asleep."""
    clock = Clock(START)
    scheduler = SnapshotScheduler(
        instance, Schedule("15m", 900, RetentionPolicy(keep=keep)), clock=clock, sleep=clock.sleep
    )
    scheduler.start()
    await asyncio.sleep(0.01)
    return scheduler, clock


def names(instance: Instance) -> list[str]:
    return [s.name for s in instance.snapshot_records()]


def test_slots_names_and_pruning_with_a_test_clock() -> None:
    async def body(instance: Instance) -> None:
        await instance.create_snapshot("before-upgrade")
        scheduler, clock = await started_scheduler(instance, keep=3)
        assert clock.sleeps == [467]  # to 03:15:00
        assert scheduler.public()["next_at"] == calendar.timegm((2026, 12, 2, 3, 15, 0))
        assert instance.status()["snapshot_schedule"] is None  # not the instance's own
        for _ in range(5):
            await clock.next_slot()
        assert names(instance) == [
            "before-upgrade",  # manual: never pruned, not counted
            "auto-20261202T034500Z",
            "auto-20261202T040000Z",
            "auto-20261202T041500Z",
        ]
        assert clock.sleeps[1:] == [900] * 5
        public = scheduler.public()
        assert (public["taken"], public["pruned"], public["last_error"]) == (5, 2, None)
        assert public["last_snapshot"] == "auto-20261202T041500Z"
        await scheduler.stop()

    asyncio.run(with_instance(body))


def test_restore_skips_a_slot_and_the_restored_snapshot_is_kept() -> None:
    async def body(instance: Instance) -> None:
        scheduler, clock = await started_scheduler(instance, keep=1)
        await clock.next_slot()
        assert names(instance) == ["auto-20261202T031500Z"]
        restore = asyncio.ensure_future(instance.restore("auto-20261202T031500Z", force=False))
        for _ in range(10_000):
            if instance.restoring:
                break
            await asyncio.sleep(0)
        assert instance.restoring
        await clock.next_slot()  # the 03:30 slot comes while the restore runs
        await restore
        assert scheduler.skipped == 1 and names(instance) == ["auto-20261202T031500Z"]
        for _ in range(2):
            await clock.next_slot()
        # keep = 1, but the disk was restored from the first: it stays
        assert names(instance) == ["auto-20261202T031500Z", "auto-20261202T040000Z"]
        assert scheduler.pruned == 1
        await scheduler.stop()

    asyncio.run(with_instance(body))


def test_stopping_lets_a_snapshot_in_progress_finish() -> None:
    """Cancelling one half-way could leave a checkpoint the catalog never records."""

    async def body(instance: Instance) -> None:
        scheduler, clock = await started_scheduler(instance, keep=1)
        async with instance._admin_lock:  # a manual snapshot or restore holds it
            clock.release()
            await asyncio.sleep(0.05)
            stopping = asyncio.ensure_future(scheduler.stop())
            await asyncio.sleep(0.05)
            assert not stopping.done()
        await stopping
        assert names(instance) == ["auto-20261202T031500Z"]

    asyncio.run(with_instance(body))


async def mount(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["mount", *args], check=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_failed_snapshot_is_logged_shown_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    config = Config()
    config.storage.url = f"file://{store}"
    config.storage.timeout_ms = 1000

    async def body(instance: Instance) -> None:
        assert instance.device is not None
        scheduler, clock = await started_scheduler(instance, keep=1)
        await clock.next_slot()
        assert names(instance) == ["auto-20261202T031500Z"]
        await mount("--bind", str(store), str(store))
        try:
            await mount("-o", "remount,bind,ro", str(store))
            await instance.device.write(0, memoryview(b"x" * 65536))
            await clock.next_slot()
            error = scheduler.public()["last_error"]
            assert error.startswith("snapshot auto-20261202T033000Z: "), error
            assert "is read-only" in error
            assert names(instance) == ["auto-20261202T031500Z"]  # nothing pruned after it
            await mount("-o", "remount,bind,rw", str(store))
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(store)], timeout=30)
        await clock.next_slot()
        assert scheduler.public()["last_error"] is None
        assert names(instance) == ["auto-20261202T034500Z"]
        await scheduler.stop()

    with caplog.at_level(logging.WARNING, "portalbd.schedule"):
        asyncio.run(with_instance(body, config))
    assert "scheduled snapshot auto-20261202T033000Z failed (next slot retries): " in caplog.text


def test_a_daemon_takes_and_prunes_on_schedule(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    conf = tmp_path / "schedule.toml"
    conf.write_text('[snapshots]\nevery = "1s"\nkeep = 2\n')
    daemon = daemon_factory("-c", str(conf))
    assert ctl(*sock(daemon), "snapshot", "create", "mine").returncode == 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        schedule = daemon.status()["snapshot_schedule"]
        if schedule["pruned"] >= 2:
            break
        time.sleep(0.2)
    assert schedule["pruned"] >= 2, schedule
    assert (schedule["every"], schedule["every_s"], schedule["keep"]) == ("1s", 1, 2)
    assert schedule["last_error"] is None and schedule["next_at"] > time.time() - 1

    table = ctl(*sock(daemon), "snapshot", "list").stdout.splitlines()
    rows = [row.split() for row in table[1:]]
    assert rows[0][0] == "mine" and rows[0][-1] == "B"  # a manual row as it always was
    autos = [row for row in rows if is_scheduled(row[0])]
    assert 1 <= len(autos) <= 3 and all(row[-1] == "scheduled" for row in autos)  # 2, +1 racing
    assert [row[0] for row in autos] == sorted(row[0] for row in autos)  # names sort as times

    status = ctl(*sock(daemon), "status").stdout
    line = next(line for line in status.splitlines() if "Schedule:" in line)
    assert re.search(r"every 1s, keep 2; next \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", line), line
    assert "scheduled snapshot pruned name=auto-" in daemon.log()
