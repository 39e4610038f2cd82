"""Byte ranges to block pieces: the arithmetic every device operation shares.

Pure and tiny so that property tests can check it against a bytearray.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

_KEY = struct.Struct(">Q")


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


def block_key(block: int) -> bytes:
    """Storage key of a block: 8 bytes big-endian, so key order is disk order."""
    return _KEY.pack(block)


def key_block(key: bytes) -> int:
    value: int = _KEY.unpack(key)[0]
    return value


def blocks_for(size: int, block_size: int) -> int:
    """How many blocks a device of ``size`` bytes spans (the last may be partial)."""
    return -(-size // block_size)
