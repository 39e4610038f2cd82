"""Shared pieces of the crash, fault and load tests: bounds, soak mode, a model.

``PORTALBD_SOAK_SECONDS=N`` turns the bounded CI runs into soaks: the crash,
fault and load tests then repeat their cycles until N seconds have passed
(``./dev test`` leaves it unset; a nightly job or a person sets it).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass, field

REGION = 64 * 1024  # one write = one device block: atomic per the contract
ZERO_HASH = hashlib.blake2b(bytes(REGION), digest_size=16).digest()


def soak_seconds() -> float:
    return float(os.environ.get("PORTALBD_SOAK_SECONDS", "0") or 0)


class Budget:
    """Run at least ``cycles`` times, or until the soak deadline."""

    def __init__(self, cycles: int) -> None:
        self.cycles = cycles
        self.done = 0
        self.deadline = time.monotonic() + soak_seconds()

    def more(self) -> bool:
        if self.done < self.cycles or time.monotonic() < self.deadline:
            self.done += 1
            return True
        return False


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def pattern(seed: int, region: int, seq: int) -> bytes:
    """A region's content for one write: unique, self-describing, cheap."""
    head = f"portalbd seed={seed} region={region} seq={seq}\n".encode()
    body = random.Random(seed * 1_000_003 + seq).randbytes(REGION - len(head))
    return head + body


@dataclass
class RegionModel:
    """What each 64 KiB region may hold after a crash.

    ``history[r]`` lists the values acknowledged since the last one known
    durable (which is first); ``pending[r]`` is a write in flight.
    ``dropped[r]`` counts the values already dropped from the front, so a
    FLUSH's mark is an absolute position: a flush acknowledged on another
    connection meanwhile (which drops a prefix) cannot shift it.
    """

    regions: int
    history: list[list[bytes]] = field(default_factory=list)
    pending: dict[int, bytes] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = [[ZERO_HASH] for _ in range(self.regions)]
        self.dropped = [0] * self.regions

    def current(self, region: int) -> bytes:
        return self.history[region][-1]

    def begin_write(self, region: int, value: bytes) -> None:
        self.pending[region] = value

    def acked(self, region: int, value: bytes) -> None:
        self.pending.pop(region, None)
        self.history[region].append(value)

    def durable(self, region: int, value: bytes) -> None:
        """A write acknowledged as durable (FUA): the only value allowed now."""
        self.pending.pop(region, None)
        self.dropped[region] += len(self.history[region])
        self.history[region][:] = [value]

    def flush_issued(self, regions: list[int]) -> dict[int, int]:
        """Remember where each region stood when a FLUSH was sent."""
        return {r: self.dropped[r] + len(self.history[r]) - 1 for r in regions}

    def flush_acked(self, mark: dict[int, int]) -> None:
        """That FLUSH returned OK: what came before its mark is gone for good."""
        for region, position in mark.items():
            drop = min(position - self.dropped[region], len(self.history[region]) - 1)
            if drop > 0:
                del self.history[region][:drop]
                self.dropped[region] += drop

    def settle(self) -> None:
        """Everything flushed with no I/O in flight: only the current values."""
        for region in range(self.regions):
            self.durable(region, self.current(region))

    def allowed(self, region: int) -> set[bytes]:
        values = set(self.history[region])
        if region in self.pending:
            values.add(self.pending[region])
        return values

    def adopt(self, observed: list[bytes]) -> None:
        for region, value in enumerate(observed):
            self.dropped[region] += len(self.history[region])
            self.history[region] = [value]
        self.pending.clear()
