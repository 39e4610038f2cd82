"""Which blocks the store holds as a base value alone, with no newer page deltas.

A block written as page deltas (format 2) has to be read with a range scan,
because its base and deltas are separate keys. A scan costs two binding
round trips and a get one: on 4 KiB random reads a get-only load ran 1.57x
faster. Most blocks never get deltas (sequential writes, whole-block
writes, trims), and the device sees that happen: a drain that wrote a
block's base (newer than any of its deltas) or a scan that found no delta
keys tells it the block can be read with a get until it drains deltas again.

The knowledge lives in memory only, one bit per block in groups, and starts
empty on every open: wrong in the safe direction only (an unknown block is
scanned, which is always right).
"""

from __future__ import annotations

GROUP_BLOCKS = 4096  # blocks per bitmap: 512 bytes, 256 MiB of 64 KiB blocks


class BaseOnlyBlocks:
    """A sparse bitmap of blocks known to have no deltas newer than their base."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[int, bytearray] = {}

    def __contains__(self, block: int) -> bool:
        bits = self._groups.get(block // GROUP_BLOCKS)
        if bits is None:
            return False
        index = block % GROUP_BLOCKS
        return bool(bits[index >> 3] & (1 << (index & 7)))

    def add(self, block: int) -> None:
        group, index = divmod(block, GROUP_BLOCKS)
        bits = self._groups.get(group)
        if bits is None:
            bits = self._groups[group] = bytearray(GROUP_BLOCKS // 8)
        bits[index >> 3] |= 1 << (index & 7)

    def discard(self, block: int) -> None:
        bits = self._groups.get(block // GROUP_BLOCKS)
        if bits is not None:
            index = block % GROUP_BLOCKS
            bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def clear(self) -> None:
        self._groups.clear()

    @property
    def memory_bytes(self) -> int:
        return len(self._groups) * (GROUP_BLOCKS // 8)
