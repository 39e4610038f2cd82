"""Which blocks of the disk hold data (are not holes), counted without asking on every status.

``status`` reports ``allocated_bytes``: the blocks a sparse-aware copy would
read, as NBD block status reports them (allocated zeros count; holes do
not). SlateDB keeps no such total, and a scan of the whole key space reads
every stored value, so it is done once: a background scan when the daemon
opens the disk (and again after a restore, which swaps the disk), at a
bounded pace. From then on each drain into the store says which blocks it
made data or holes, and a bitmap (one bit per block) turns that into an
exact count. Blocks a drain touched while the scan runs keep the drain's
word, which is newer than anything the scan may have read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from portalbd.bitmap import SparseBitmap
from portalbd.pages import base_key, group_by_block

if TYPE_CHECKING:
    from portalbd.device import Device

log = logging.getLogger("portalbd.allocation")

# Stored entries one scan step reads. The binding decodes and copies the
# step's values on the event loop (a few ms per MiB), so steps stay small,
# and after each the scan rests twice as long as the step took: it never
# takes more than about a third of the loop from client I/O.
SCAN_ENTRIES = 16
SCAN_PAUSE_S = 0.02  # the shortest rest between steps
SCAN_REST = 2.0  # rest after a step, as a multiple of the step's duration
# The opening scan reads every stored value through the binding (on S3: the
# whole disk's data, in GETs). Past this many stored blocks (64 GiB of 64 KiB
# blocks) it stops, and the count stays unknown rather than cost that at
# every start.
SCAN_MAX_STORED_BLOCKS = 1 << 20


class TooMuchToScan(Exception):
    """The disk stores more than the opening scan is allowed to read."""


Scan = Callable[[bytes, bytes, int], Awaitable[list[tuple[bytes, bytes]]]]
IsAllocated = Callable[[Sequence[tuple[bytes, bytes]]], bool]


class AllocationMap:
    """A bit per block, set when the block holds data; ``allocated_blocks`` counts them.

    Sparse (``bitmap.py``): a disk far larger than what it stores costs
    only the groups that hold data.
    """

    def __init__(self, block_count: int) -> None:
        self.block_count = block_count
        self._bits = SparseBitmap()
        self.allocated_blocks = 0
        # Blocks drained since the scan began; None once the scan is done.
        self._touched: SparseBitmap | None = SparseBitmap()
        self.scanned_blocks = 0  # how far the scan has come, for status

    @property
    def ready(self) -> bool:
        """The count is exact (the opening scan finished)."""
        return self._touched is None

    def is_allocated(self, block: int) -> bool:
        return block in self._bits

    def _set(self, block: int, allocated: bool) -> None:
        if (block in self._bits) == allocated:
            return
        if allocated:
            self._bits.add(block)
            self.allocated_blocks += 1
        else:
            self._bits.discard(block)
            self.allocated_blocks -= 1

    def drained(self, block: int, allocated: bool) -> None:
        """A drain made `block` data (True) or a hole (False) in the store."""
        if not 0 <= block < self.block_count:
            return
        self._set(block, allocated)
        if self._touched is not None:
            self._touched.add(block)

    def scanned(self, block: int, allocated: bool) -> None:
        """The scan found `block` stored; a drain's newer word wins."""
        touched = self._touched
        if touched is None or not 0 <= block < self.block_count:
            return
        if block not in touched:
            self._set(block, allocated)

    def finish_scan(self) -> None:
        self._touched = None
        self.scanned_blocks = self.block_count


async def scan(
    amap: AllocationMap,
    read: Scan,
    allocated: IsAllocated,
    entries_per_block: int = 17,
    max_stored_blocks: int | None = None,
) -> None:
    """Walk the block key space once, in bounded steps, and fill in `amap`.

    Blocks the scan does not meet are holes, which is what a fresh map
    says; so only stored blocks cost work here. A step reads at least one
    whole block (`entries_per_block`: its base and a delta per page).
    """
    block, end = 0, amap.block_count
    limit = max(SCAN_ENTRIES, entries_per_block + 1)
    stored = 0
    if max_stored_blocks is None:
        max_stored_blocks = SCAN_MAX_STORED_BLOCKS
    while block < end:
        started = time.monotonic()
        found = await read(base_key(block), base_key(end), limit)
        groups = list(group_by_block(found))
        following = end
        if len(found) == limit and groups:
            # The last block may have more entries past the limit: read it again.
            following = groups[-1][0] if len(groups) > 1 else groups[0][0] + 1
            if len(groups) > 1:
                groups.pop()
        for b, entries in groups:
            amap.scanned(b, allocated(entries))
        stored += len(groups)
        if stored > max_stored_blocks:
            raise TooMuchToScan(
                f"the disk stores more than {max_stored_blocks} blocks; allocated data is"
                " not counted at start (it would read them all from storage)"
            )
        block = following
        amap.scanned_blocks = block
        await asyncio.sleep(max(SCAN_PAUSE_S, SCAN_REST * (time.monotonic() - started)))
    amap.finish_scan()


class Tracker:
    """The map of the disk being served, and the scan that fills it in the background.

    A failed scan (storage unreachable) is logged and tried again later;
    until one completes, ``allocated_bytes`` is None and status leaves the
    key out rather than report a partial count.
    """

    RETRY_S = 30.0

    def __init__(self) -> None:
        self.map: AllocationMap | None = None
        self._task: asyncio.Task[None] | None = None
        self._block_size = 0
        self._size = 0
        self.not_counted: str | None = None  # why the count will stay unknown

    def start(self, device: Device) -> None:
        """Count the blocks `device` serves: a new map, fed by its drains and one scan."""
        self._stop_task()
        self._block_size, self._size = device.block_size, device.size
        self.not_counted = None
        amap = AllocationMap(-(-device.size // device.block_size))
        self.map = device.allocation = amap
        self._task = asyncio.get_running_loop().create_task(
            self._run(amap, device), name="portalbd-allocation-scan"
        )

    async def _run(self, amap: AllocationMap, device: Device) -> None:
        while True:
            try:
                per_block = 1 + device.block_size // device.page_size
                await scan(amap, device.store.scan, device.stored_allocated, per_block)
                log.info(
                    "allocation scan done: %d of %d blocks hold data",
                    amap.allocated_blocks,
                    amap.block_count,
                )
                return
            except TooMuchToScan as exc:
                self.not_counted = str(exc)
                log.warning("allocation scan stopped: %s", exc)
                return
            except Exception as exc:  # a storage hiccup: the count stays unknown
                log.warning("allocation scan failed, retrying in %.0f s: %s", self.RETRY_S, exc)
            await asyncio.sleep(self.RETRY_S)

    async def scanned(self) -> None:
        """Until the current scan has finished (or was stopped)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    @property
    def allocated_bytes(self) -> int | None:
        amap = self.map
        if amap is None or not amap.ready:
            return None
        return min(amap.allocated_blocks * self._block_size, self._size)

    @property
    def scan_progress(self) -> float | None:
        """How far the opening scan has come (0 to 1) while it runs; None before or after."""
        amap = self.map
        if amap is None or amap.ready or self.not_counted is not None:
            return None
        return amap.scanned_blocks / amap.block_count if amap.block_count else 0.0

    def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
