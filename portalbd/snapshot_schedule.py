"""The snapshot scheduler: one task that snapshots the disk at every slot and prunes.

A scheduled snapshot goes through the instance exactly as ``portalctl
snapshot create`` does (the same lock, the same flush of everything
acknowledged). After it, the scheduled snapshots the policy no longer keeps
are deleted (retention.py decides which). A failure is logged and shown in
status, and the next slot tries again; nothing is pruned after a snapshot
that failed, so a sick disk keeps the history it has. A slot that comes
while a restore runs is skipped.

The clock and the sleep are parameters so tests drive the schedule without
waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from portalbd.retention import (
    PREFIX,
    RetentionPolicy,
    SnapshotLike,
    next_slot,
    snapshot_name,
    to_prune,
)
from portalbd.units import human_time

log = logging.getLogger("portalbd.schedule")


class ScheduleTarget(Protocol):
    """What the scheduler needs of the instance (portalbd/instance.py)."""

    @property
    def restoring(self) -> bool: ...

    def snapshot_records(self) -> Sequence[SnapshotLike]: ...

    def protected_snapshots(self) -> Collection[str]: ...

    async def create_snapshot(self, name: str) -> dict[str, Any]: ...

    async def prune_snapshot(self, name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Schedule:
    every: str  # as the operator wrote it ("15m"), for status
    every_s: int
    policy: RetentionPolicy


class SnapshotScheduler:
    def __init__(
        self,
        target: ScheduleTarget,
        schedule: Schedule,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.target = target
        self.schedule = schedule
        self._clock = clock
        self._sleep = sleep
        self.next_at: float | None = None
        self.last_snapshot: str | None = None
        self.last_error: str | None = None
        self.taken = 0
        self.pruned = 0
        self.skipped = 0
        self._task: asyncio.Task[None] | None = None
        self._tick: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name="portalbd-snapshot-schedule"
        )

    async def stop(self) -> None:
        """Stop waiting for slots; a snapshot or prune in progress is let finish.

        Cancelling one half-way could leave a checkpoint the catalog never
        records, holding its files for good.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tick is not None and not self._tick.done():
            with contextlib.suppress(Exception):
                await self._tick

    async def run(self) -> None:
        every = self.schedule.every_s
        while True:
            slot = next_slot(self._clock(), every)
            self.next_at = slot
            while (left := slot - self._clock()) > 0:
                await self._sleep(left)
            self._tick = asyncio.ensure_future(self.tick(slot))
            try:
                await asyncio.shield(self._tick)
            except Exception as exc:  # a bug, not a storage error: keep the schedule going
                self.last_error = f"slot {snapshot_name(slot)}: {exc!r}"
                log.exception("scheduled snapshot slot failed unexpectedly")

    async def tick(self, slot: float) -> None:
        """Take the slot's snapshot, then prune; never raises."""
        if self.target.restoring:
            self.skipped += 1
            log.info("scheduled snapshot skipped: a restore is in progress")
            return
        name = snapshot_name(slot)
        if any(s.name == name for s in self.target.snapshot_records()):
            log.debug("scheduled snapshot %s exists already", name)
        else:
            try:
                await self.target.create_snapshot(name)
            except Exception as exc:  # logged and retried at the next slot
                self.last_error = f"snapshot {name}: {exc}"
                log.warning("scheduled snapshot %s failed (next slot retries): %s", name, exc)
                return
            self.taken += 1
            self.last_snapshot = name
        self.last_error = None
        await self.prune()

    async def prune(self) -> None:
        doomed = to_prune(
            self.target.snapshot_records(),
            self.schedule.policy,
            self.target.protected_snapshots(),
        )
        for name in doomed:
            try:
                deleted = await self.target.prune_snapshot(name)
            except Exception as exc:
                self.last_error = f"pruning {name}: {exc}"
                log.warning("pruning %s failed (next slot retries): %s", name, exc)
                return
            if deleted:
                self.pruned += 1
                log.info("scheduled snapshot pruned name=%s", name)

    def public(self) -> dict[str, Any]:
        """The ``snapshot_schedule`` field of status (docs/control-protocol.md)."""
        policy = self.schedule.policy
        return {
            "every": self.schedule.every,
            "every_s": self.schedule.every_s,
            "keep": policy.keep,
            "keep_daily": policy.keep_daily,
            "keep_weekly": policy.keep_weekly,
            "prefix": PREFIX,
            "next_at": self.next_at,
            "last_snapshot": self.last_snapshot,
            "last_error": self.last_error,
            "taken": self.taken,
            "pruned": self.pruned,
            "skipped": self.skipped,
        }


def schedule_text(schedule: dict[str, Any]) -> str:
    """A status document's ``snapshot_schedule`` in one line, for portalctl and the TUI."""
    text = f"every {schedule.get('every')}, keep {schedule.get('keep')}"
    if schedule.get("keep_daily"):
        text += f" + {schedule['keep_daily']} daily"
    if schedule.get("keep_weekly"):
        text += f" + {schedule['keep_weekly']} weekly"
    if schedule.get("next_at") is not None:
        text += f"; next {human_time(float(schedule['next_at']))}"
    if schedule.get("last_error"):
        text += f"; last attempt failed: {schedule['last_error']}"
    return text
