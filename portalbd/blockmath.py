"""Byte ranges to block pieces: the arithmetic every device operation shares.

Pure and tiny so that property tests can check it against a bytearray.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple


class Piece(NamedTuple):
    """The part of one block that a byte range touches."""

    block: int  # block index
    start: int  # first byte inside the block
    end: int  # one past the last byte inside the block
    offset: int  # where this piece starts inside the request's buffer

    @property
    def length(self) -> int:
        return self.end - self.start

    def whole(self, block_size: int) -> bool:
        return self.start == 0 and self.end == block_size


def pieces(offset: int, length: int, block_size: int) -> Iterator[Piece]:
    """Split ``[offset, offset+length)`` at block boundaries, in order."""
    position = offset
    stop = offset + length
    while position < stop:
        block, start = divmod(position, block_size)
        end = min(block_size, start + (stop - position))
        yield Piece(block, start, end, position - offset)
        position += end - start


def blocks_for(size: int, block_size: int) -> int:
    """How many blocks a device of ``size`` bytes spans (the last may be partial)."""
    return -(-size // block_size)
