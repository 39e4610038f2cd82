"""Which scheduled snapshots retention prunes: tables for the rules, properties for the promises."""

from __future__ import annotations

import calendar
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from portalbd.retention import (
    RetentionPolicy,
    is_scheduled,
    next_slot,
    parse_duration,
    snapshot_name,
    to_prune,
)


@dataclass(frozen=True)
class Snap:
    name: str
    created_at: int


def at(text: str) -> int:
    """``"2026-12-02 03:15"`` (UTC) to Unix seconds."""
    return calendar.timegm(
        (int(text[:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]), 0)
    )


def auto(text: str) -> Snap:
    when = at(text)
    return Snap(snapshot_name(when), when)


def test_names_sort_as_times_and_are_recognised() -> None:
    assert snapshot_name(at("2026-12-02 03:15")) == "auto-20261202T031500Z"
    assert is_scheduled("auto-20261202T031500Z")
    for manual in ("before-upgrade", "auto-", "auto-nightly", "auto-20261202T031500Z-x", "Auto-1"):
        assert not is_scheduled(manual)


def test_slots_are_aligned_to_the_interval() -> None:
    assert next_slot(at("2026-12-02 03:07") + 13, 900) == at("2026-12-02 03:15")
    assert next_slot(at("2026-12-02 03:15"), 900) == at("2026-12-02 03:30")  # strictly after
    assert parse_duration("15m") == 900


def test_keep_the_newest_n() -> None:
    snaps = [auto(f"2026-12-02 03:{m:02d}") for m in range(0, 60, 15)]
    assert to_prune(snaps, RetentionPolicy(keep=2)) == [snaps[0].name, snaps[1].name]
    assert to_prune(snaps, RetentionPolicy(keep=10)) == []


def test_manual_snapshots_are_never_pruned_nor_counted() -> None:
    manual = Snap("before-upgrade", at("2026-12-01 00:00"))
    snaps = [manual, auto("2026-12-02 03:00"), auto("2026-12-02 03:15"), auto("2026-12-02 03:30")]
    assert to_prune(snaps, RetentionPolicy(keep=2)) == [snaps[1].name]


def test_protected_snapshot_survives() -> None:
    snaps = [auto("2026-12-02 03:00"), auto("2026-12-02 03:15"), auto("2026-12-02 03:30")]
    assert to_prune(snaps, RetentionPolicy(keep=1), {snaps[0].name}) == [snaps[1].name]


def test_daily_and_weekly_tiers_keep_the_newest_of_each_bucket() -> None:
    # Four snapshots a day (00, 06, 12, 18) from Mon 2026-11-16 to Wed 2026-12-02.
    snaps = [
        auto(f"2026-{month:02d}-{day:02d} {hour:02d}:00")
        for month, days in ((11, range(16, 31)), (12, range(1, 3)))
        for day in days
        for hour in (0, 6, 12, 18)
    ]
    policy = RetentionPolicy(keep=3, keep_daily=3, keep_weekly=2)
    pruned = set(to_prune(snaps, policy))
    kept = sorted(s.name for s in snaps if s.name not in pruned)
    assert kept == [
        "auto-20261129T180000Z",  # weekly: newest of the week of Nov 23-29
        "auto-20261130T180000Z",  # daily: Nov 30
        "auto-20261201T180000Z",  # daily: Dec 1
        "auto-20261202T060000Z",  # keep 3
        "auto-20261202T120000Z",
        "auto-20261202T180000Z",  # newest: keep, daily Dec 2, weekly Nov 30-Dec 6
    ]


def test_tiers_count_days_that_have_snapshots_not_days_back_from_now() -> None:
    """A daemon stopped for weeks keeps its older dailies on restart."""
    snaps = [auto("2026-10-01 00:00"), auto("2026-10-02 00:00"), auto("2026-12-02 03:00")]
    assert to_prune(snaps, RetentionPolicy(keep=1, keep_daily=3)) == []


def test_no_scheduled_snapshots_nothing_to_do() -> None:
    assert to_prune([], RetentionPolicy(keep=1)) == []
    assert to_prune([Snap("mine", 0)], RetentionPolicy(keep=1)) == []


snapshot_lists = st.lists(
    st.one_of(
        st.integers(at("2026-01-01 00:00"), at("2027-01-01 00:00")).map(
            lambda t: Snap(snapshot_name(t), t)
        ),
        st.builds(Snap, st.sampled_from(["manual", "auto-x", "nightly"]), st.integers(0, 2**31)),
    ),
    max_size=40,
    unique_by=lambda s: s.name,
)
policies = st.builds(RetentionPolicy, st.integers(1, 10), st.integers(0, 10), st.integers(0, 6))


@given(snapshot_lists, policies)
def test_promises(snaps: list[Snap], policy: RetentionPolicy) -> None:
    pruned = to_prune(snaps, policy)
    scheduled = sorted((s for s in snaps if is_scheduled(s.name)), key=lambda s: s.created_at)
    assert all(is_scheduled(name) for name in pruned)  # never a manual one
    assert len(set(pruned)) == len(pruned)
    if scheduled:
        assert scheduled[-1].name not in pruned  # never the newest
    kept = [s for s in scheduled if s.name not in pruned]
    assert len(kept) >= min(len(scheduled), policy.keep)
    assert len(kept) <= policy.keep + policy.keep_daily + policy.keep_weekly
    # pruning again prunes nothing more: the scheduler converges
    assert to_prune([s for s in snaps if s.name not in pruned], policy) == []
    # a protected one is never pruned
    if pruned:
        assert pruned[0] not in to_prune(snaps, policy, {pruned[0]})
