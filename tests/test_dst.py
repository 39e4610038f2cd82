"""Deterministic simulation over a range of seeds, and the bugs it found."""

from __future__ import annotations

import asyncio

import pytest

from portalbd.config import LsmConfig
from portalbd.device import Device
from portalbd.store.slate import SlateHandle, resolve_object_store

# --- regressions -------------------------------------------------------------------


async def _device_with_cache(cache_blocks: int) -> tuple[Device, SlateHandle]:
    store = await SlateHandle.open(
        resolve_object_store("memory:///"),
        "dev",
        LsmConfig(flush_interval_ms=0, block_cache_size_bytes=0),
    )
    bs = 4096
    device = Device(
        store, size=64 * bs, block_size=bs, cache_bytes=cache_blocks * bs, dirty_bytes=64 * bs
    )
    device.start()
    pattern = bytes(range(256)) * 16 * 16
    await device.write(0, memoryview(pattern))
    await device.flush()
    device.forget_clean_cache()
    return device, store


@pytest.mark.parametrize("cache_blocks", [0, 4])
def test_read_larger_than_the_clean_cache_completes(cache_blocks: int) -> None:
    """Bug (found by the simulation): a read needing more blocks than the
    clean cache holds loaded them, evicted them again and looped forever, so
    with ``cache_bytes = 0`` every uncached read hung."""

    async def scenario() -> None:
        device, store = await _device_with_cache(cache_blocks)
        data = await asyncio.wait_for(device.read(0, 16 * 4096), 10)
        assert bytes(data) == bytes(range(256)) * 16 * 16
        await device.stop()
        await store.close()

    asyncio.run(scenario())


def test_partial_write_with_caching_disabled_completes() -> None:
    """Bug: with ``cache_bytes = 0`` an unaligned write waited forever for
    its block to appear in a cache that never keeps anything."""

    async def scenario() -> None:
        device, store = await _device_with_cache(0)
        await asyncio.wait_for(device.write(10, memoryview(b"x" * 100)), 10)
        data = await asyncio.wait_for(device.read(0, 4096), 10)
        expected = bytearray(bytes(range(256)) * 16)
        expected[10:110] = b"x" * 100
        assert bytes(data) == bytes(expected)
        await device.stop()
        await store.close()

    asyncio.run(scenario())
