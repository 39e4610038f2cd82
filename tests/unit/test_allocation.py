"""The count of blocks holding data (status `allocated_bytes`), on a real in-memory SlateDB.

The truth is what NBD block status reports after a flush: every block
without the hole flag. The count kept from drains, with the opening scan
running at the same time, must equal it, and so must a fresh scan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from hypothesis import example, given, settings
from hypothesis import strategies as st

from portalbd import allocation
from portalbd.allocation import AllocationMap, Tracker
from portalbd.config import LsmConfig
from portalbd.device import Device
from portalbd.nbd.wire import STATE_HOLE
from portalbd.store.slate import SlateHandle, resolve_object_store

BS = 16384  # four 4 KiB pages: partial writes drain as page deltas
BLOCKS = 12
SIZE = BLOCKS * BS - 1000  # a partial last block


async def allocated_by_block_status(device: Device) -> int:
    blocks, position = 0, 0
    while position < device.size:
        for length, flags in await device.block_status(position, device.size - position):
            if not flags & STATE_HOLE:
                blocks += -(-length // BS)  # extents of data are whole blocks here
            position += length
    return blocks


@contextlib.contextmanager
def no_rest() -> Iterator[None]:
    """The scan's rests between steps protect client I/O; a test has none."""
    saved = allocation.SCAN_PAUSE_S, allocation.SCAN_REST
    allocation.SCAN_PAUSE_S = allocation.SCAN_REST = 0.0
    try:
        yield
    finally:
        allocation.SCAN_PAUSE_S, allocation.SCAN_REST = saved


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "trim", "zero", "zero_nohole", "flush"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * BS),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(before=ops, during=ops)
@example(before=[("write", 0, 2 * BS)], during=[("trim", 0, BS), ("write", 5 * BS, 1)])
def test_the_count_is_what_block_status_says(
    before: list[tuple[str, int, int]], during: list[tuple[str, int, int]]
) -> None:
    async def apply(device: Device, operations: list[tuple[str, int, int]]) -> None:
        for kind, offset, length in operations:
            length = min(length, SIZE - offset)
            if kind == "write":
                await device.write(offset, memoryview(b"\x01" * length), fua=False)
            elif kind == "trim":
                await device.trim(offset, length)
            elif kind == "flush":
                await device.flush()
            else:
                await device.write_zeroes(offset, length, no_hole=kind == "zero_nohole")

    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "a", LsmConfig(block_cache_size_bytes=0))
        device = Device(handle, size=SIZE, block_size=BS, cache_bytes=4 * BS, dirty_bytes=3 * BS)
        device.start()
        await apply(device, before)  # on disk before the daemon "opens" it
        await device.flush()
        amap = device.allocation = AllocationMap(-(-SIZE // BS))

        async def stale_read(start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes]]:
            """The worst case: clients write and drain between the scan's read and its use."""
            found = await handle.scan(start, end, limit)
            await apply(device, during)
            await device.flush()
            return found

        await allocation.scan(amap, stale_read, device.stored_allocated, 5)
        truth = await allocated_by_block_status(device)
        assert amap.ready and amap.allocated_blocks == truth
        fresh = AllocationMap(amap.block_count)  # and a scan from scratch agrees
        await allocation.scan(fresh, handle.scan, device.stored_allocated, 5)
        assert fresh.allocated_blocks == truth
        # The daemon's way: a tracker started on the open device, writes meanwhile.
        tracker = Tracker()
        tracker.start(device)
        await apply(device, before)
        await device.flush()
        await tracker.scanned()
        truth = await allocated_by_block_status(device)
        assert tracker.allocated_bytes == min(truth * BS, SIZE)
        await tracker.stop()
        await device.stop()
        await handle.close()

    with no_rest():
        asyncio.run(body())


def test_a_scan_reads_a_block_again_when_the_limit_cuts_it() -> None:
    """Scan steps end where the read stopped; a block split by the limit is read again whole."""
    calls: list[tuple[int, int]] = []

    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "b", LsmConfig(block_cache_size_bytes=0))
        device = Device(handle, size=600 * BS, block_size=BS, cache_bytes=0, dirty_bytes=64 * BS)
        device.start()
        for block in range(0, 600, 2):  # 300 data blocks, more than one scan step reads
            await device.write(block * BS, memoryview(b"\x02" * BS), fua=False)
        await device.flush()

        async def read(start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes]]:
            found = await handle.scan(start, end, limit)
            calls.append((amap.scanned_blocks, len(found)))  # how far it had come
            return found

        amap = AllocationMap(600)
        await allocation.scan(amap, read, device.stored_allocated, 5)
        assert amap.ready and amap.allocated_blocks == 300
        assert amap.is_allocated(598) and not amap.is_allocated(599)
        await device.stop()
        await handle.close()

    with no_rest():
        asyncio.run(body())
    # Full steps (the limit: a whole block of 1 + 4 entries fits), each leaving its
    # last block to the next.
    limit = allocation.SCAN_ENTRIES
    steps = -(-(300 - limit) // (limit - 1))
    assert [n for _, n in calls] == [limit] * steps + [300 - steps * (limit - 1)]
    reached = [at for at, _ in calls]  # status reports it as allocation_scan_progress
    assert reached[0] == 0 and reached == sorted(set(reached)) and reached[-1] < 600


def test_a_huge_disk_that_stores_little_costs_little_memory() -> None:
    """A 1 EiB disk has 2^44 blocks: a flat bitmap of it would take 2 TiB."""
    amap = AllocationMap(1 << 44)
    for block in (0, 1, (1 << 44) - 1):
        amap.drained(block, True)
    amap.drained(1, False)
    assert amap.allocated_blocks == 2 and amap.is_allocated((1 << 44) - 1)


def test_the_opening_scan_stops_past_its_limit_and_says_why() -> None:
    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "c", LsmConfig(block_cache_size_bytes=0))
        device = Device(handle, size=64 * BS, block_size=BS, cache_bytes=0, dirty_bytes=64 * BS)
        device.start()
        await device.write(0, memoryview(b"\x03" * 40 * BS), fua=True)
        saved = allocation.SCAN_MAX_STORED_BLOCKS
        allocation.SCAN_MAX_STORED_BLOCKS = 20
        try:
            tracker = Tracker()
            tracker.start(device)
            await tracker.scanned()
        finally:
            allocation.SCAN_MAX_STORED_BLOCKS = saved
        assert tracker.allocated_bytes is None and tracker.scan_progress is None
        assert tracker.not_counted == (
            "the disk stores more than 20 blocks; allocated data is not counted at start"
            " (it would read them all from storage)"
        )
        await device.stop()
        await handle.close()

    with no_rest():
        asyncio.run(body())
