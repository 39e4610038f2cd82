"""The block status map: what scans found, kept per group of blocks."""

from __future__ import annotations

from portalbd.nbd.wire import STATE_HOLE, STATE_ZERO
from portalbd.statusmap import GROUP_BLOCKS, StatusMap

HOLE = STATE_HOLE | STATE_ZERO


def test_runs_follow_what_a_scan_found_and_stop_where_coverage_ends() -> None:
    status = StatusMap()
    assert status.run(0, 100) is None and status.scan_start(70) == 0
    status.learn(0, 50, {3: 0, 4: 0, 9: STATE_ZERO})
    assert status.run(0, 100) == (HOLE, 3)
    assert status.run(3, 100) == (0, 5)
    assert status.run(5, 100) == (HOLE, 9)
    assert status.run(9, 100) == (STATE_ZERO, 10)
    assert status.run(10, 100) == (HOLE, 50)  # covered up to 50 only
    assert status.run(10, 20) == (HOLE, 20)
    assert status.run(50, 100) is None and status.scan_start(70) == 50
    status.learn(50, 80, {60: 0})  # contiguous: coverage grows
    assert status.run(61, 100) == (HOLE, 80)
    status.note(70, 0)  # a drain wrote data there
    assert status.run(61, 100) == (HOLE, 70) and status.run(70, 100) == (0, 71)


def test_only_groups_with_something_stored_are_kept_and_coverage_is_contiguous() -> None:
    status = StatusMap()
    status.learn(0, 3 * GROUP_BLOCKS, {GROUP_BLOCKS + 5: 0})
    assert len(status) == 1  # groups 0 and 2 hold nothing: a scan of them is cheap
    assert status.run(0, 10) is None
    assert status.next_known(0) == GROUP_BLOCKS and status.next_known(GROUP_BLOCKS) is None
    assert status.run(GROUP_BLOCKS, 3 * GROUP_BLOCKS) == (HOLE, GROUP_BLOCKS + 5)
    # a scan that began in the middle of an unknown group teaches nothing
    status.learn(2 * GROUP_BLOCKS + 7, 3 * GROUP_BLOCKS, {2 * GROUP_BLOCKS + 9: 0})
    assert status.run(2 * GROUP_BLOCKS + 9, 3 * GROUP_BLOCKS) is None
    status.note(5, 0)  # an unknown group stays unknown
    assert status.run(5, 10) is None


def test_the_oldest_groups_go_first_when_full() -> None:
    status = StatusMap(max_groups=2)
    for group in range(3):
        status.learn(group * GROUP_BLOCKS, (group + 1) * GROUP_BLOCKS, {group * GROUP_BLOCKS: 0})
    assert len(status) == 2
    assert status.run(0, 1) is None
    assert status.run(2 * GROUP_BLOCKS, 2 * GROUP_BLOCKS + 1) == (0, 2 * GROUP_BLOCKS + 1)
    assert status.next_known(0) == GROUP_BLOCKS
    status.clear()
    assert len(status) == 0 and status.next_known(0) is None


def test_a_map_of_no_groups_learns_nothing() -> None:
    status = StatusMap(max_groups=0)
    status.learn(0, GROUP_BLOCKS, {1: 0})
    assert len(status) == 0 and status.run(1, 2) is None
