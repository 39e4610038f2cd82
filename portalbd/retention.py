"""Scheduled snapshots: their names, their interval, and which ones to prune.

Pure logic, kept apart from the scheduler task (``snapshot_schedule.py``) so
the one decision that deletes data can be tested alone, on any list of
snapshots and any policy, without a daemon or a clock.

A scheduled snapshot is recognised by its name alone: ``auto-`` followed by
the UTC time of its slot (``auto-20261202T031500Z``). Names sort as times,
and a manual snapshot can never be taken for one unless an operator types
exactly such a name. Nothing else is ever pruned.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

PREFIX = "auto-"
_NAME = re.compile(r"auto-\d{8}T\d{6}Z")
_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SnapshotLike(Protocol):
    """What retention reads of a snapshot record (store/instance.py's SnapshotRecord)."""

    @property
    def name(self) -> str: ...

    @property
    def created_at(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many scheduled snapshots survive: the newest ``keep``, plus tiers.

    ``keep_daily``: the newest snapshot of each of the most recent N UTC days
    that have one; ``keep_weekly`` the same per ISO week. A tier counts days
    (weeks) that have snapshots, not calendar days back from now, so a daemon
    that was stopped for a month does not prune its history on restart.
    """

    keep: int
    keep_daily: int = 0
    keep_weekly: int = 0


def parse_duration(text: str) -> int:
    """``"30s"``, ``"15m"``, ``"1h"``, ``"1d"`` to seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def is_scheduled(name: str) -> bool:
    """True for the names the scheduler gives, the only snapshots it may prune."""
    return _NAME.fullmatch(name) is not None


def snapshot_name(slot: float) -> str:
    """The name of the snapshot taken for the slot at ``slot`` (Unix seconds, UTC)."""
    return PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(int(slot)))


def next_slot(now: float, every_s: int) -> float:
    """The first slot after ``now``: multiples of the interval since the epoch.

    Aligned slots make names predictable (every 15 minutes is :00, :15,
    :30, :45) and let a restarted daemon continue the same series.
    """
    return float((int(now) // every_s + 1) * every_s)


def to_prune(
    snapshots: Sequence[SnapshotLike],
    policy: RetentionPolicy,
    protected: Collection[str] = (),
) -> list[str]:
    """The names of the scheduled snapshots the policy no longer keeps, oldest first.

    Never a manual snapshot (any name :func:`is_scheduled` refuses), never the
    newest scheduled one whatever the policy says, never a ``protected`` one
    (the snapshot the disk was restored from).
    """
    scheduled = sorted(
        (s for s in snapshots if is_scheduled(s.name)),
        key=lambda s: (s.created_at, s.name),
        reverse=True,
    )
    kept = {s.name for s in scheduled[: max(1, policy.keep)]}
    kept.update(name for name in protected)
    days: set[tuple[int, int, int]] = set()
    weeks: set[tuple[int, int]] = set()
    for snap in scheduled:  # newest first: the first seen of a bucket is its newest
        moment = time.gmtime(snap.created_at)
        day = (moment.tm_year, moment.tm_mon, moment.tm_mday)
        if day not in days and len(days) < policy.keep_daily:
            days.add(day)
            kept.add(snap.name)
        iso = _iso_week(moment)
        if iso not in weeks and len(weeks) < policy.keep_weekly:
            weeks.add(iso)
            kept.add(snap.name)
    return [s.name for s in reversed(scheduled) if s.name not in kept]


def _iso_week(moment: time.struct_time) -> tuple[int, int]:
    year, week = time.strftime("%G %V", moment).split()
    return int(year), int(week)
