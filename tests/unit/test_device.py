"""The device layer against a plain bytearray, on a real in-memory SlateDB."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from portalbd.blockmath import blocks_for, pieces
from portalbd.config import LsmConfig
from portalbd.device import Device, DeviceError
from portalbd.store.slate import SlateHandle, resolve_object_store

BS = 4096
SIZE = 16 * BS


async def open_device(**kwargs: Any) -> tuple[Device, SlateHandle, Any]:
    store = resolve_object_store("memory:///")
    handle = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
    options: dict[str, Any] = {"cache_bytes": 8 * BS, "dirty_bytes": 6 * BS}
    options.update(kwargs)
    device = Device(handle, size=SIZE, block_size=BS, **options)
    device.start()
    return device, handle, store


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.sampled_from([512, 4096, 65536]))
def test_pieces_cover_the_range_exactly(offset: int, length: int, block_size: int) -> None:
    parts = list(pieces(offset, length, block_size))
    assert sum(p.length for p in parts) == length
    position = offset
    for part in parts:
        assert part.block * block_size + part.start == position
        assert 0 <= part.start < part.end <= block_size
        assert part.offset == position - offset
        position += part.length
    assert blocks_for(offset + length, block_size) >= len({p.block for p in parts})


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "trim", "zero", "zero_nohole", "flush", "read", "fua"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * BS),
        st.integers(0, 255),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_device_matches_bytearray_model(operations: list[tuple[str, int, int, int]]) -> None:
    async def body() -> None:
        device, handle, _ = await open_device()
        model = bytearray(SIZE)
        for kind, offset, length, byte in operations:
            length = min(length, SIZE - offset)
            if kind in ("write", "fua"):
                data = bytes([byte]) * length
                await device.write(offset, memoryview(data), fua=kind == "fua")
                model[offset : offset + length] = data
            elif kind in ("trim", "zero", "zero_nohole"):
                if kind == "trim":
                    await device.trim(offset, length)
                else:
                    await device.write_zeroes(offset, length, no_hole=kind == "zero_nohole")
                model[offset : offset + length] = bytes(length)
            elif kind == "flush":
                await device.flush()
            got = bytes(await device.read(offset, length))
            assert got == bytes(model[offset : offset + length]), (kind, offset, length)
        assert bytes(await device.read(0, SIZE)) == bytes(model)
        await device.stop()
        # Everything is in the store after stop: a fresh device sees it all.
        fresh = Device(handle, size=SIZE, block_size=BS, cache_bytes=0, dirty_bytes=4 * BS)
        assert bytes(await fresh.read(0, SIZE)) == bytes(model)
        await handle.close()

    asyncio.run(body())


def test_concurrent_partial_writes_to_one_block_both_survive() -> None:
    async def body() -> None:
        device, handle, _ = await open_device()
        await device.write(0, memoryview(b"\x01" * BS))
        await device.flush()
        # Forget the cached copy so both writers need a store read.
        device._clean.clear()
        device.cached_bytes = 0
        first = device.write(0, memoryview(b"A" * (BS // 2)))
        second = device.write(BS // 2, memoryview(b"B" * (BS // 2)))
        await asyncio.gather(first, second)
        assert bytes(await device.read(0, BS)) == b"A" * (BS // 2) + b"B" * (BS // 2)
        await device.stop()
        await handle.close()

    asyncio.run(body())


def test_unaligned_trim_keeps_neighbouring_bytes() -> None:
    async def body() -> None:
        device, handle, _ = await open_device()
        await device.write(0, memoryview(b"x" * (3 * BS)))
        await device.trim(100, 2 * BS)
        data = bytes(await device.read(0, 3 * BS))
        assert data[:100] == b"x" * 100
        assert data[100 : 100 + 2 * BS] == bytes(2 * BS)
        assert data[100 + 2 * BS :] == b"x" * (BS - 100)
        await device.stop()
        await handle.close()

    asyncio.run(body())


def test_block_status_reports_holes_zeroes_and_data() -> None:
    async def body() -> None:
        device, handle, _ = await open_device()
        await device.write(BS, memoryview(b"d" * BS))
        await device.write_zeroes(2 * BS, BS, no_hole=True)
        await device.flush()
        extents = await device.block_status(0, 4 * BS)
        assert extents == [(BS, 3), (BS, 0), (BS, 2), (BS, 3)]
        await device.stop()
        await handle.close()

    asyncio.run(body())


def test_dirty_memory_stays_bounded_under_many_writes() -> None:
    async def body() -> None:
        device, handle, _ = await open_device(dirty_bytes=4 * BS, cache_bytes=2 * BS)
        peak = 0
        for round_ in range(5):
            for block in range(16):
                await device.write(block * BS, memoryview(bytes([round_ + 1]) * BS))
                peak = max(peak, device.dirty_bytes + device.draining_bytes)
        assert peak <= 4 * BS
        assert device.cached_bytes <= 2 * BS
        assert bytes(await device.read(0, SIZE)) == b"".join(bytes([5]) * BS for _ in range(16))
        await device.stop()
        await handle.close()

    asyncio.run(body())


def test_crash_keeps_flushed_writes() -> None:
    """Drop the handle without shutdown: what FLUSH acknowledged survives."""

    async def body() -> None:
        device, _handle, store = await open_device()
        await device.write(0, memoryview(b"F" * BS))
        await device.flush()
        await device.write(BS, memoryview(b"U" * BS))  # never flushed
        # "crash": no stop(), no close(); open the same store afresh
        reopened = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
        fresh = Device(reopened, size=SIZE, block_size=BS, cache_bytes=0, dirty_bytes=4 * BS)
        assert bytes(await fresh.read(0, BS)) == b"F" * BS
        assert bytes(await fresh.read(BS, BS)) in (b"U" * BS, bytes(BS))
        await reopened.close()

    asyncio.run(body())


def test_large_discard_on_sparse_and_dense_disks() -> None:
    """Big trims ask the store what exists; the result must not depend on it."""

    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "big", LsmConfig(block_cache_size_bytes=0))
        size = 300 * BS
        device = Device(handle, size=size, block_size=BS, cache_bytes=16 * BS, dirty_bytes=32 * BS)
        device.start()
        model = bytearray(size)
        for block in (3, 70, 71, 200, 299):
            data = bytes([block % 251 + 1]) * BS
            await device.write(block * BS, memoryview(data))
            model[block * BS : (block + 1) * BS] = data
        await device.flush()
        await device.write(150 * BS, memoryview(b"m" * BS))  # still only in memory
        model[150 * BS : 151 * BS] = b"m" * BS
        await device.trim(2 * BS + 10, 100 * BS)  # sparse region, unaligned edges
        model[2 * BS + 10 : 102 * BS + 10] = bytes(100 * BS)
        assert bytes(await device.read(0, size)) == bytes(model)
        for block in range(100, 300):  # now make it dense
            await device.write(block * BS, memoryview(bytes([7]) * BS))
        model[100 * BS :] = bytes([7]) * (200 * BS)
        await device.flush()
        await device.trim(100 * BS, 150 * BS)
        model[100 * BS : 250 * BS] = bytes(150 * BS)
        assert bytes(await device.read(0, size)) == bytes(model)
        await device.stop()
        fresh = Device(handle, size=size, block_size=BS, cache_bytes=0, dirty_bytes=4 * BS)
        assert bytes(await fresh.read(0, size)) == bytes(model)
        await handle.close()

    asyncio.run(body())


def test_full_buffer_with_failing_storage_gives_an_error_not_a_hang() -> None:
    async def body() -> None:
        device, handle, _ = await open_device(dirty_bytes=4 * BS, writeback_delay=0.05)
        await handle.close()  # the storage goes away under the device
        error = None
        for block in range(16):
            try:
                await asyncio.wait_for(device.write(block * BS, memoryview(b"w" * BS)), 10)
            except DeviceError as exc:
                error = exc
                break
        assert error is not None and "storage failing" in str(error)
        try:
            await asyncio.wait_for(device.flush(), 10)
        except DeviceError as exc:
            assert "closed" in str(exc) or "fail" in str(exc)
        else:
            raise AssertionError("flush succeeded on closed storage")

    asyncio.run(body())


def test_flush_shares_the_wal_flush_of_a_held_background_drain() -> None:
    """A background drain puts its blocks in the store at once and holds the
    WAL flush back; a FLUSH then needs that one WAL flush, not a drain of
    its own, and writes meanwhile are not blocked."""

    async def body() -> None:
        device, handle, store = await open_device(writeback_delay=60)
        await device.write(0, memoryview(b"a" * BS))
        for _ in range(100):  # the background drain has written its batch
            if handle.counters.batches:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert handle.counters.batches == 1 and handle.counters.flushes == 0
        assert device.draining_bytes == BS  # held: not durable yet, still ours
        assert device.write_nowait(BS, memoryview(b"b" * BS))  # not blocked by the hold
        await asyncio.wait_for(device.flush(), 10)  # far sooner than writeback_delay
        # the held drain's flush, then one drain for the write made meanwhile
        assert handle.counters.flushes == 2
        await device.flush()  # nothing new since: no store call at all
        assert handle.counters.flushes == 2
        reopened = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
        fresh = Device(reopened, size=SIZE, block_size=BS, cache_bytes=0, dirty_bytes=4 * BS)
        assert bytes(await fresh.read(0, 2 * BS)) == b"a" * BS + b"b" * BS
        await reopened.close()

    asyncio.run(body())


def test_background_drain_makes_writes_durable_without_a_flush() -> None:
    async def body() -> None:
        device, handle, store = await open_device(writeback_delay=0.02)
        await device.write(3 * BS, memoryview(b"d" * BS))
        for _ in range(500):
            if handle.counters.flushes and not device.draining_bytes:
                break
            await asyncio.sleep(0.01)
        assert handle.counters.flushes >= 1 and device.dirty_bytes == device.draining_bytes == 0
        reopened = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
        fresh = Device(reopened, size=SIZE, block_size=BS, cache_bytes=0, dirty_bytes=4 * BS)
        assert bytes(await fresh.read(3 * BS, BS)) == b"d" * BS
        await reopened.close()

    asyncio.run(body())
