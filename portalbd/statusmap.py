"""What the store holds per block, as block status answers it, for stretches already scanned.

BLOCK_STATUS learns what is stored with range scans, and a scan returns every
value it passes: a data block costs its 64 KiB through the binding's per-byte
copy even though only its 9-byte envelope header is read. Mapping a disk
with 256 MiB of data therefore moved 256 MiB through the binding on every
``nbdinfo --map``. This map keeps what a scan found (hole, allocated zeros or
data, as NBD flags) for groups of blocks, from each group's first block up
to where scans have covered it, and drains keep it current for the blocks
they write. Block status answers a covered stretch from here and ends its
scans where the next group that has any stored block begins.

Only groups in which a scan found something are kept (a stretch with nothing
stored costs a scan that returns nothing, which is cheap), at most
``max_groups`` of them (4 KiB each; the oldest go first), and the map starts
empty at every open: forgetting is always safe, the store is asked again.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Mapping

from portalbd.nbd.wire import STATE_HOLE, STATE_ZERO

GROUP_BLOCKS = 4096  # blocks per group: 4 KiB of flags, 256 MiB of 64 KiB blocks
MAX_GROUPS = 1024  # 4 MiB of flags at most
HOLE_FLAGS = STATE_HOLE | STATE_ZERO
_VALUES = (0, STATE_ZERO, HOLE_FLAGS)


class _Group:
    __slots__ = ("covered", "flags")

    def __init__(self) -> None:
        self.flags = bytearray([HOLE_FLAGS]) * GROUP_BLOCKS
        self.covered = 0  # blocks from the group's first that scans have seen


class StatusMap:
    """Block status flags of scanned stretches of the store, by group of blocks."""

    __slots__ = ("_groups", "_starts", "max_groups")

    def __init__(self, max_groups: int = MAX_GROUPS) -> None:
        self.max_groups = max_groups
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._starts: list[int] = []  # the groups' numbers, sorted

    def clear(self) -> None:
        self._groups.clear()
        self._starts.clear()

    def __len__(self) -> int:
        return len(self._groups)

    def run(self, block: int, stop: int) -> tuple[int, int] | None:
        """``(flags, end)``: ``block`` up to ``end`` (at most ``stop``) share ``flags``
        as far as the map knows, or None when the store must be asked about ``block``."""
        number, index = divmod(block, GROUP_BLOCKS)
        group = self._groups.get(number)
        if group is None or index >= group.covered:
            return None
        flags = group.flags
        value = flags[index]
        limit = min(group.covered, stop - number * GROUP_BLOCKS)
        end = limit
        for other in _VALUES:
            if other != value:
                found = flags.find(other, index, limit)
                if found != -1 and found < end:
                    end = found
        return value, number * GROUP_BLOCKS + end

    def scan_start(self, block: int) -> int:
        """Where a scan that must tell about ``block`` should begin: where its
        group's covered stretch ends (at most ``block``), so coverage grows."""
        number = block // GROUP_BLOCKS
        group = self._groups.get(number)
        covered = 0 if group is None else group.covered
        return min(block, number * GROUP_BLOCKS + covered)

    def next_known(self, block: int) -> int | None:
        """The first block of the first kept group after ``block``'s own group."""
        i = bisect.bisect_right(self._starts, block // GROUP_BLOCKS)
        return self._starts[i] * GROUP_BLOCKS if i < len(self._starts) else None

    def learn(self, start: int, end: int, stored: Mapping[int, int]) -> None:
        """A scan saw every stored block of ``[start, end)``: ``stored`` maps the
        ones it found to their flags, the rest are holes."""
        if not self.max_groups:
            return  # kept off (a replica: another daemon writes the store)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for b, value in stored.items():
            if start <= b < end:
                by_group.setdefault(b // GROUP_BLOCKS, []).append((b, value))
        number = start // GROUP_BLOCKS
        while number * GROUP_BLOCKS < end:
            first = number * GROUP_BLOCKS
            lo, hi = max(start, first), min(end, first + GROUP_BLOCKS)
            found = by_group.get(number, ())
            group = self._groups.get(number)
            # Coverage grows only contiguously from the group's first block.
            if group is None and lo == first and found:
                group = self._add(number)
            if group is not None and lo <= first + group.covered:
                flags = group.flags
                flags[lo - first : hi - first] = bytes([HOLE_FLAGS]) * (hi - lo)
                for b, value in found:
                    flags[b - first] = value
                group.covered = max(group.covered, hi - first)
            number += 1

    def note(self, block: int, flags: int) -> None:
        """A drain made ``block`` read with ``flags``: kept only where known."""
        group = self._groups.get(block // GROUP_BLOCKS)
        if group is not None:
            group.flags[block % GROUP_BLOCKS] = flags

    def _add(self, number: int) -> _Group:
        while len(self._groups) >= self.max_groups:
            old, _ = self._groups.popitem(last=False)
            del self._starts[bisect.bisect_left(self._starts, old)]
        group = self._groups[number] = _Group()
        bisect.insort(self._starts, number)
        return group
