"""Deterministic write payloads for replay.

Traces carry no data.  A replayed write fills its range with a pattern that
depends only on the absolute device offset of each byte, so replaying a
trace of writes yields the same disk whatever the order overlapping writes
land in, and a client that writes the same pattern (tests do) produces a disk
a replay must reproduce byte for byte.  The pattern is a 64-bit
multiplicative hash per 8-byte word: cheap with numpy, and incompressible
enough that compression settings are not flattered.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_MULT = np.uint64(0x9E3779B97F4A7C15)
_SEED = np.uint64(0x5DEECE66D)


def pattern(offset: int, length: int) -> npt.NDArray[np.uint8]:
    """The bytes a replayed write of `length` bytes at `offset` carries."""
    first = offset // 8
    last = (offset + length + 7) // 8
    words = np.arange(first, last, dtype=np.uint64)
    words *= _MULT
    words ^= _SEED
    raw = words.astype("<u8", copy=False).view(np.uint8)
    skip = offset - first * 8
    return raw[skip : skip + length]


def pattern_bytes(offset: int, length: int) -> bytes:
    return pattern(offset, length).tobytes()
