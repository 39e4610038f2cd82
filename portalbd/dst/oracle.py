"""A model of the disk: what reads must return and what a crash may leave.

The simulation runs in *rounds*: the operations of one round run
concurrently but never touch the same bytes (they may share a block), so the
acknowledged state after a round does not depend on the order in which the
server finished them. Per block the oracle keeps:

* ``current``: the acknowledged content; every read must return it;
* ``rounds``: for each round since the block was last known durable, the
  block states that round could have passed through (its writes applied in
  any order, i.e. every subset of its pieces on top of the state before it).

A store reopened after a crash holds a prefix of what was written to it, so a
block must read as one of those states. A FLUSH acknowledged in round *r*
makes the state before *r* durable (earlier rounds drop out); a FUA write
acknowledged in round *r* forces its own bytes into every surviving state of
that round.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes of one operation inside one block."""

    start: int
    data: bytes
    forced: bool = False  # acknowledged with FUA: must survive a crash


@dataclass(slots=True)
class _Round:
    base: bytes
    pieces: list[Piece] = field(default_factory=list)


class DiskOracle:
    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.block_size = block_size
        self.blocks = -(-size // block_size)
        self.current = bytearray(size)
        self._history: dict[int, list[_Round]] = {}
        self._touched: dict[int, _Round] = {}

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(self.size, start + self.block_size)

    def block(self, block: int) -> bytes:
        start, end = self.block_range(block)
        return bytes(self.current[start:end])

    # --- one round ------------------------------------------------------

    def begin_round(self) -> None:
        self._touched = {}

    def write(self, offset: int, data: bytes, *, acked: bool, forced: bool) -> None:
        """Record a write of this round; ``acked`` ones change ``current``."""
        bs = self.block_size
        pos = 0
        while pos < len(data):
            block, start = divmod(offset + pos, bs)
            take = min(bs - start, len(data) - pos)
            rnd = self._touched.get(block)
            if rnd is None:
                rnd = self._touched[block] = _Round(self.block(block))
            rnd.pieces.append(Piece(start, data[pos : pos + take], forced and acked))
            pos += take
        if acked:
            self.current[offset : offset + len(data)] = data

    def end_round(self, *, flushed: bool) -> None:
        """Close the round; ``flushed`` when a FLUSH in it was acknowledged."""
        if flushed:
            # Everything acknowledged before the round is durable now.
            for block in list(self._history):
                if block not in self._touched:
                    del self._history[block]
        for block, rnd in self._touched.items():
            history = self._history.setdefault(block, [])
            if flushed or any(piece.forced for piece in rnd.pieces):
                history.clear()
            history.append(rnd)
        self._touched = {}

    # --- after a crash --------------------------------------------------------

    def allowed(self, block: int) -> set[bytes]:
        history = self._history.get(block)
        if not history:
            return {self.block(block)}
        states: set[bytes] = set()
        for rnd in history:
            forced = [piece for piece in rnd.pieces if piece.forced]
            optional = [piece for piece in rnd.pieces if not piece.forced]
            for n in range(len(optional) + 1):
                for chosen in itertools.combinations(optional, n):
                    buf = bytearray(rnd.base)
                    # Pieces of one round never overlap, so order is irrelevant.
                    for piece in (*forced, *chosen):
                        buf[piece.start : piece.start + len(piece.data)] = piece.data
                    states.add(bytes(buf))
        return states

    def check_after_crash(self, disk: bytes) -> list[str]:
        """Every block must hold a state it could durably have; adopt the disk."""
        problems: list[str] = []
        for block in range(self.blocks):
            start, end = self.block_range(block)
            got = disk[start:end]
            allowed = self.allowed(block)
            if got not in allowed:
                problems.append(
                    f"block {block} holds a state it never had durably "
                    f"({len(allowed)} allowed; differs from acknowledged at "
                    f"{_first_difference(got, self.block(block))})"
                )
        self.reset(disk)
        return problems

    def reset(self, disk: bytes) -> None:
        """The disk is now exactly ``disk`` and durable (after reopen or restore)."""
        self.current[:] = disk
        self._history.clear()
        self._touched = {}


def _first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"byte {i}: {x:#04x} != {y:#04x}"
    return "length" if len(a) != len(b) else "nowhere"
