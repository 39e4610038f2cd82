"""A sparse bitmap over block numbers, in fixed groups allocated on first use.

Disks may be far larger than what they store (a 1 EiB disk has 2^44 blocks
of 64 KiB: a flat bitmap of it would take 2 TiB), so only groups that hold
a set bit take memory.
"""

from __future__ import annotations

GROUP_BLOCKS = 4096  # blocks per group: 512 bytes, 256 MiB of 64 KiB blocks


class SparseBitmap:
    """Set, clear and test bits by block number; memory grows with what is set."""

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
