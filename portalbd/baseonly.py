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

from portalbd.bitmap import GROUP_BLOCKS as GROUP_BLOCKS
from portalbd.bitmap import SparseBitmap


class BaseOnlyBlocks(SparseBitmap):
    """A sparse bitmap of blocks known to have no deltas newer than their base."""

    __slots__ = ()
