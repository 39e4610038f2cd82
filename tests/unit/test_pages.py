"""Format 2: the value envelope, page deltas and their merge, against models.

The device runs on a real in-memory SlateDB with blocks of several pages,
so that page-aligned writes into unread blocks become page deltas, reads and
later writes merge them, whole-block writes shadow them, and drains run
concurrently with everything else (a 1 ms write-back delay).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portalbd.baseonly import GROUP_BLOCKS, BaseOnlyBlocks
from portalbd.config import LsmConfig
from portalbd.device import Device
from portalbd.nbd.wire import STATE_HOLE, STATE_ZERO
from portalbd.pages import (
    Layout,
    Pages,
    base_key,
    compose,
    delta_key,
    group_by_block,
    merge_stored,
    split_batches,
    stored_flags,
)
from portalbd.store import envelope
from portalbd.store.slate import SlateHandle, resolve_object_store

PS = 4096
BS = 4 * PS
SIZE = 12 * BS


# --- the envelope -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3 * PS), st.integers(0, 2**64 - 1), st.booleans())
def test_envelope_round_trips(payload: bytes, seq: int, compress: bool) -> None:
    stored = envelope.encode(payload, seq, compress=compress)
    codec, got_seq, got = envelope.decode(stored, len(payload))
    assert got_seq == seq
    if payload.count(0) == len(payload):
        assert codec == envelope.CODEC_ZERO and got is None
    else:
        assert got == payload


def test_envelope_stores_what_compresses_compressed_and_the_rest_raw() -> None:
    text = b"portalbd " * 2000
    assert envelope.header(envelope.encode(text, 1))[0] == envelope.CODEC_LZ4
    assert len(envelope.encode(text, 1)) < len(text) // 10
    noise = os.urandom(PS)
    packed = envelope.encode(noise, 1)
    assert envelope.header(packed)[0] == envelope.CODEC_RAW
    assert len(packed) == PS + envelope.HEADER_SIZE
    assert envelope.encode(None, 7) == envelope.HEADER.pack(envelope.CODEC_HOLE, 7)


def test_envelope_probes_the_ends_of_large_values_before_compressing() -> None:
    """A 64 KiB value is compressed only when its first or last 4 KiB
    compress; incompressible data is stored raw without a full attempt."""
    size = 64 * 1024
    noise = os.urandom(size)
    text = b"portalbd " * (size // 9 + 1)
    head_text = text[: size // 2] + noise[: size // 2]
    tail_zeros = noise[: size - PS] + bytes(PS)  # a file's last block, padded
    middle_only = noise[:PS] + text[: size - 2 * PS] + noise[:PS]
    for value, codec in [
        (noise, envelope.CODEC_RAW),
        (head_text, envelope.CODEC_LZ4),
        (tail_zeros, envelope.CODEC_RAW),  # 1/16 zeros saves less than 1/8
        (noise[: size // 2] + bytes(size // 2), envelope.CODEC_LZ4),
        (middle_only, envelope.CODEC_RAW),  # the probe's blind spot: stored raw
    ]:
        stored = envelope.encode(value, 3)
        assert envelope.header(stored)[0] == codec
        assert envelope.decode(stored, size)[2] == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x00\x01", "shorter than its header"),
        (envelope.HEADER.pack(0x80, 1) + b"x", "envelope flags 0x80"),
        (envelope.HEADER.pack(0x09, 1), "unknown codec 9"),
        (envelope.HEADER.pack(envelope.CODEC_HOLE, 1) + b"x", "a hole value carries a payload"),
        (envelope.HEADER.pack(envelope.CODEC_RAW, 1) + b"abc", "holds 3 bytes, expected 4096"),
        (envelope.HEADER.pack(envelope.CODEC_LZ4, 1) + b"\xff\xff", "corrupt lz4 payload"),
    ],
)
def test_envelope_refuses_what_it_cannot_read(value: bytes, message: str) -> None:
    with pytest.raises(envelope.EnvelopeError, match=message):
        envelope.decode(value, PS)


# --- merging stored entries -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.binary(min_size=BS, max_size=BS), st.just(b"\x00" * BS)),
    st.integers(0, 100),
    st.dictionaries(
        st.integers(0, BS // PS - 1),
        st.tuples(st.integers(0, 200), st.binary(min_size=PS, max_size=PS)),
    ),
)
def test_merge_applies_only_deltas_newer_than_the_base(
    base: bytes | None, base_seq: int, deltas: dict[int, tuple[int, bytes]]
) -> None:
    entries = []
    model = bytearray(BS)
    if base is not None:
        entries.append((base_key(3), envelope.encode(base, base_seq)))
        model[:] = base
    newest = -1
    for page in sorted(deltas):
        seq, data = deltas[page]
        entries.append((delta_key(3, page), envelope.encode(data, seq)))
        if seq > (base_seq if base is not None else -1):
            model[page * PS : (page + 1) * PS] = data
            newest = max(newest, seq)
    value, _ = merge_stored(entries, BS, PS)
    assert (value or bytes(BS)) == bytes(model)
    flags = stored_flags(entries)
    if newest >= 0 or (base is not None and any(base)):
        assert flags == 0
    elif base is None:
        assert flags == envelope.CODEC_HOLE
    else:
        assert flags == envelope.CODEC_ZERO


def test_pages_refuse_a_partial_page_they_do_not_hold() -> None:
    pages = Pages(BS, PS)
    pages.put(PS, 2 * PS, b"a" * PS)
    pages.put(PS + 10, PS + 20, b"b" * 10)  # inside a held page: fine
    with pytest.raises(ValueError, match="needs the page's old contents"):
        pages.put(10, 20, b"c" * 10)
    block = compose(b"z" * BS, [pages], BS)
    assert block[:PS] == b"z" * PS
    assert block[PS : PS + 10] == b"a" * 10 and block[PS + 10 : PS + 20] == b"b" * 10


def test_scan_entries_group_per_block_with_their_deltas() -> None:
    keys = [base_key(1), delta_key(1, 0), delta_key(1, 3), delta_key(2, 1), base_key(5)]
    assert sorted(keys) == keys  # a block's deltas sort right after its base
    groups = [(b, [k for k, _ in g]) for b, g in group_by_block((k, b"") for k in keys)]
    assert groups == [(1, keys[:3]), (2, keys[3:4]), (5, keys[4:])]


# --- the device with page deltas, against a bytearray ---------------------------------


async def open_device(
    cache_blocks: int, version: int = 2, writeback_delay: float = 0.001, **extra: Any
) -> Device:
    store = resolve_object_store("memory:///")
    handle = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
    device = Device(
        handle,
        size=SIZE,
        block_size=BS,
        cache_bytes=cache_blocks * BS,
        dirty_bytes=6 * BS,
        writeback_delay=writeback_delay,
        layout=Layout(version=version, page_size=PS),
        **extra,
    )
    device.start()
    return device


Op = tuple[str, int, int, int]


def aligned_or_not(draw: Any) -> tuple[int, int]:
    if draw(st.booleans()):
        page = draw(st.integers(0, SIZE // PS - 1))
        count = draw(st.integers(1, min(6, SIZE // PS - page)))
        return page * PS, count * PS
    offset = draw(st.integers(0, SIZE - 1))
    return offset, draw(st.integers(1, min(2 * BS, SIZE - offset)))


@st.composite
def waves(draw: Any) -> list[list[Op]]:
    """Groups of operations run concurrently; within a group no two touch the
    same byte, so any order gives the same result and the model stays exact."""
    out: list[list[Op]] = []
    for _ in range(draw(st.integers(1, 8))):
        wave: list[Op] = []
        taken: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.sampled_from(["write", "write", "trim", "zero", "read", "flush"]))
            offset, length = aligned_or_not(draw)
            if any(offset < end and start < offset + length for start, end in taken):
                continue
            taken.append((offset, offset + length))
            wave.append((kind, offset, length, draw(st.integers(1, 255))))
        out.append(wave)
    return out


async def run_waves(device: Device, plan: list[list[Op]], model: bytearray) -> None:
    async def one(kind: str, offset: int, length: int, byte: int) -> None:
        if kind == "write":
            data = bytes([byte]) * length
            await device.write(offset, memoryview(data))
            model[offset : offset + length] = data
        elif kind in ("trim", "zero"):
            if kind == "trim":
                await device.trim(offset, length)
            else:
                await device.write_zeroes(offset, length)
            model[offset : offset + length] = bytes(length)
        elif kind == "read":
            got = bytes(await device.read(offset, length))
            assert got == model[offset : offset + length], f"read {offset}+{length}"
        else:
            await device.flush()

    for wave in plan:
        expected = bytes(model)
        await asyncio.gather(*(one(*op) for op in wave))
        assert_budget_counts_what_is_held(device)
        for kind, offset, length, _ in wave:
            if kind == "read":
                continue
            # concurrent ops touch disjoint bytes: outside them nothing moved
            expected = (
                expected[:offset]
                + bytes(model[offset : offset + length])
                + expected[offset + length :]
            )
        assert bytes(model) == expected


def assert_budget_counts_what_is_held(device: Device) -> None:
    """The write-back budget's count is the sum of what its entries hold, also
    after pages were written into an entry in place."""
    held = sum(device._entry_cost(v) for v in device._dirty.values())
    assert device.dirty_bytes == held
    assert device.draining_bytes >= 0


def test_scattered_page_writes_count_their_pages_not_whole_blocks() -> None:
    async def body() -> None:
        device = await open_device(0, writeback_delay=60)
        blocks = 5  # of the budget's 6 blocks: counted whole, that would be most of it
        for block in range(blocks):
            await device.write(block * BS + PS, memoryview(b"p" * PS))
        assert device.dirty_bytes + device.draining_bytes < blocks * (PS + 1024)
        await device.write(0, memoryview(b"q" * PS))  # a second page of block 0, in place
        assert_budget_counts_what_is_held(device)
        for page in range(BS // PS):  # the rest of block 1: now whole
            await device.write(BS + page * PS, memoryview(bytes([page]) * PS))
        assert isinstance(device._dirty.get(1, device._draining.get(1)), bytearray | bytes)
        assert_budget_counts_what_is_held(device)
        await device.flush()
        assert device.dirty_bytes == 0
        assert bytes(await device.read(PS, PS)) == b"p" * PS
        assert bytes(await device.read(BS + 3 * PS, PS)) == bytes([3]) * PS
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def uncached_twin(device: Device) -> Device:
    """A second device on the same database, with no cache: it sees the store."""
    return Device(
        device.store,
        size=SIZE,
        block_size=BS,
        cache_bytes=0,
        dirty_bytes=6 * BS,
        layout=Layout(version=2, page_size=PS, epoch=2),
    )


async def check_whole_disk(device: Device, model: bytearray) -> None:
    got = bytes(await device.read(0, SIZE))
    assert got == bytes(model)
    position = 0
    for length, flags in await device.block_status(0, SIZE):
        if flags & STATE_ZERO:
            assert not any(model[position : position + length]), f"zero extent at {position}"
        position += length
    assert position == SIZE


@pytest.mark.parametrize("cache_blocks", [0, 2, 64])
@settings(max_examples=40, deadline=None)
@given(plan=waves())
def test_page_deltas_match_a_bytearray(cache_blocks: int, plan: list[list[Op]]) -> None:
    async def body() -> None:
        device = await open_device(cache_blocks)
        model = bytearray(SIZE)
        await run_waves(device, plan, model)
        await check_whole_disk(device, model)
        await device.flush()
        # again, with what the first block status learned and the drain since
        await check_whole_disk(device, model)
        # A fresh device on the same database sees only what the store holds.
        await check_whole_disk(uncached_twin(device), model)
        await device.stop()
        await device.store.close()

    asyncio.run(body())


@settings(max_examples=25, deadline=None)
@given(plan=waves())
def test_format_1_layout_matches_a_bytearray(plan: list[list[Op]]) -> None:
    async def body() -> None:
        device = await open_device(2, version=1)
        model = bytearray(SIZE)
        await run_waves(device, plan, model)
        await check_whole_disk(device, model)
        await device.flush()
        found = await device.store.scan(base_key(0), base_key(SIZE // BS))
        assert all(len(k) == 8 and len(v) == BS for k, v in found), "format 1 is raw blocks"
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def test_a_4k_write_into_an_unread_block_moves_one_page() -> None:
    """The point of format 2: no read, and one page through the binding."""

    async def body() -> None:
        device = await open_device(0)
        rng = random.Random(5)
        pages = [rng.randrange(SIZE // PS) for _ in range(200)]
        for page in pages:
            await device.write(page * PS, memoryview(bytes([page % 251 + 1]) * PS))
        await device.flush()
        counters = device.store.counters
        assert device.counters.loads == 0
        assert counters.bytes_put <= len(set(pages)) * (PS + envelope.HEADER_SIZE) + 4096
        model = bytearray(SIZE)
        for page in pages:
            model[page * PS : (page + 1) * PS] = bytes([page % 251 + 1]) * PS
        await check_whole_disk(device, model)
        # A whole-block write shadows the deltas under it.
        await device.write(0, memoryview(b"w" * BS))
        await device.flush()
        model[:BS] = b"w" * BS
        await check_whole_disk(uncached_twin(device), model)
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def test_a_whole_block_write_deletes_the_deltas_it_shadows() -> None:
    """Shadowed deltas are harmless to read but cost every later scan an
    entry each: a drain writing the block whole deletes those it knows of,
    whether it wrote them itself or found them in a scan."""

    async def body() -> None:
        device = await open_device(0)

        async def stored_keys() -> list[bytes]:
            return [key for key, _ in await device.store.scan(base_key(0), base_key(1))]

        for page in (1, 3):
            await device.write(page * PS, memoryview(b"p" * PS))
        await device.flush()
        assert await stored_keys() == [delta_key(0, 1), delta_key(0, 3)]
        await device.write(0, memoryview(b"w" * BS))
        await device.flush()
        assert await stored_keys() == [base_key(0)]
        assert device.counters.deltas_deleted == 2

        # A device that did not write them learns of them when it reads.
        await device.write(2 * PS, memoryview(b"q" * PS))
        await device.flush()
        twin = uncached_twin(device)
        expected = b"w" * 2 * PS + b"q" * PS + b"w" * (BS - 3 * PS)
        assert bytes(await twin.read(0, BS)) == expected
        await twin.write(0, memoryview(b"x" * (BS // 2)))
        await twin.write(BS // 2, memoryview(b"y" * (BS // 2)))
        await twin.flush()
        assert await stored_keys() == [base_key(0)]
        assert bytes(await uncached_twin(device).read(0, BS)) == b"x" * (BS // 2) + b"y" * (BS // 2)
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def test_holes_and_zero_blocks_take_almost_no_room_in_the_write_back_buffer() -> None:
    """A TRIM or WRITE_ZEROES of more blocks than the buffer holds must not
    make the next write wait for drains: its entries are a few bytes each."""

    async def body() -> None:
        device = await open_device(0)
        device.writeback_delay = 60.0  # only the flushes below drain
        await device.write(0, memoryview(b"d" * SIZE))
        await device.flush()
        await device.trim(0, SIZE // 2)
        await device.write_zeroes(SIZE // 2, SIZE // 2, no_hole=True)
        assert device.dirty_bytes < BS  # 12 blocks, against 6 blocks of room
        assert device.write_nowait(0, memoryview(b"w" * PS))
        await device.write(PS, memoryview(b"x" * (BS - PS)))  # the hole becomes data
        assert BS <= device.dirty_bytes < 2 * BS
        await device.flush()
        expected = b"w" * PS + b"x" * (BS - PS) + bytes(SIZE - BS)
        assert bytes(await uncached_twin(device).read(0, SIZE)) == expected
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def test_block_status_of_a_huge_sparse_disk_is_one_scan() -> None:
    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
        size = 1 << 60  # 1 EiB
        device = Device(
            handle, size=size, block_size=BS, cache_bytes=0, dirty_bytes=6 * BS, layout=Layout()
        )
        device.start()
        await device.write(5 * BS, memoryview(b"x" * PS))
        await device.write(1 << 40, memoryview(b"y" * BS))
        await device.write_zeroes(2 << 40, BS, no_hole=True)
        await device.flush()
        scans = handle.counters.scans
        extents = await device.block_status(0, (1 << 32) - BS)
        assert handle.counters.scans - scans == 1
        assert extents == [
            (5 * BS, STATE_HOLE | STATE_ZERO),
            (BS, 0),
            ((1 << 32) - 7 * BS, STATE_HOLE | STATE_ZERO),
        ]
        far = await device.block_status((1 << 40) - BS, 4 * BS)
        assert far == [(BS, STATE_HOLE | STATE_ZERO), (BS, 0), (2 * BS, STATE_HOLE | STATE_ZERO)]
        zeroed = await device.block_status(2 << 40, BS)
        assert zeroed == [(BS, STATE_ZERO)]
        await device.stop()
        await handle.close()

    asyncio.run(body())


def test_block_status_does_not_scan_a_stretch_it_has_scanned() -> None:
    """A scan passes every value it finds through the binding: a second map of
    the same data, and one after drains changed it, need no scan."""

    async def body() -> None:
        store = resolve_object_store("memory:///")
        handle = await SlateHandle.open(store, "dev", LsmConfig(block_cache_size_bytes=0))
        blocks = 256
        size = blocks * BS
        device = Device(
            handle, size=size, block_size=BS, cache_bytes=0, dirty_bytes=8 * BS, layout=Layout()
        )
        device.start()
        expected = [STATE_HOLE | STATE_ZERO] * blocks
        for block in range(0, blocks, 16):
            await device.write(block * BS, memoryview(b"d" * BS))
            expected[block] = 0
        await device.write_zeroes(3 * BS, BS, no_hole=True)
        expected[3] = STATE_ZERO
        await device.write(7 * BS, memoryview(b"p" * PS))  # a page delta: data
        expected[7] = 0
        await device.flush()

        def extents_of(flags: list[int]) -> list[tuple[int, int]]:
            return [(len(list(run)) * BS, f) for f, run in itertools.groupby(flags)]

        scans = handle.counters.scans
        assert await device.block_status(0, size) == extents_of(expected)
        assert handle.counters.scans > scans
        scans = handle.counters.scans
        assert await device.block_status(0, size) == extents_of(expected)
        assert await device.block_status(5 * BS, 20 * BS) == extents_of(expected[5:25])
        assert handle.counters.scans == scans
        # Drains keep it current: data into a hole, a trim, zeros over data.
        await device.write(100 * BS, memoryview(b"n" * BS))
        await device.trim(16 * BS, BS)
        await device.write_zeroes(32 * BS, BS, no_hole=True)
        expected[100], expected[16], expected[32] = 0, STATE_HOLE | STATE_ZERO, STATE_ZERO
        assert await device.block_status(0, size) == extents_of(expected)  # from memory
        await device.flush()
        assert await device.block_status(0, size) == extents_of(expected)
        assert handle.counters.scans == scans
        # A device without that knowledge finds the same in the store.
        twin = Device(
            handle, size=size, block_size=BS, cache_bytes=0, dirty_bytes=8 * BS, layout=Layout()
        )
        assert await twin.block_status(0, size) == extents_of(expected)
        # Another database (a restore): nothing learned from the old one holds.
        other = await SlateHandle.open(store, "other", LsmConfig(block_cache_size_bytes=0))
        device.swap_store(other)
        assert await device.block_status(0, size) == [(size, STATE_HOLE | STATE_ZERO)]
        await device.stop()
        await other.close()
        await handle.close()

    asyncio.run(body())


# --- drains: batches and what a get can load ---------------------------------


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    batch_bytes=st.integers(1, 5 * PS),
)
def test_batches_never_split_a_block(shape: list[int], batch_bytes: int) -> None:
    """0 in ``shape`` is a whole block, n > 0 a block written as n page deltas."""
    items: list[tuple[bytes, bytes | None]] = []
    for block, deltas in enumerate(shape):
        if deltas == 0:
            items.append((base_key(block), bytes(BS)))
        else:
            items.extend((delta_key(block, page), bytes(PS)) for page in range(deltas))
    batches = split_batches(items, batch_bytes)
    assert [item for batch in batches for item in batch] == items
    owners = [{key[:8] for key, _ in batch} for batch in batches]
    for first, second in itertools.pairwise(owners):
        assert not first & second, "a block's keys straddle two batches"
    for batch in batches[:-1]:
        # a batch ends at the first block boundary once it is full
        assert sum(len(v) + 64 for _, v in batch if isinstance(v, bytes)) >= batch_bytes


def test_base_only_bitmap_tracks_blocks_across_groups() -> None:
    known = BaseOnlyBlocks()
    blocks = [0, 7, 8, GROUP_BLOCKS - 1, GROUP_BLOCKS, 5 * GROUP_BLOCKS + 3, 1 << 40]
    for block in blocks:
        assert block not in known
        known.add(block)
    assert all(block in known for block in blocks)
    assert 1 not in known and GROUP_BLOCKS + 1 not in known
    known.discard(7)
    known.discard(123456789)  # a group never seen: nothing to forget
    assert 7 not in known and 8 in known
    assert known.memory_bytes == 4 * GROUP_BLOCKS // 8
    known.clear()
    assert 0 not in known


def test_loads_use_a_get_until_a_block_gets_deltas() -> None:
    """A block the store holds as a base alone loads with one get; after a
    drain writes page deltas for it, loads scan again (and see the pages)."""

    async def body() -> None:
        device = await open_device(0)
        counters = device.store.counters
        await device.write(0, memoryview(b"a" * (2 * BS)))  # blocks 0 and 1, whole
        await device.flush()
        gets, scans = counters.gets, counters.scans
        assert bytes(await device.read(0, PS)) == b"a" * PS
        assert bytes(await device.read(BS, PS)) == b"a" * PS
        assert (counters.gets - gets, counters.scans - scans) == (2, 0)

        await device.write(PS, memoryview(b"p" * PS))  # one page: a delta
        await device.flush()
        gets, scans = counters.gets, counters.scans
        assert bytes(await device.read(0, 2 * PS)) == b"a" * PS + b"p" * PS
        assert (counters.gets - gets, counters.scans - scans) == (0, 1)

        # A fresh device knows nothing: it scans once, then gets.
        twin = uncached_twin(device)
        gets, scans = counters.gets, counters.scans
        for _ in range(2):
            assert bytes(await twin.read(BS, PS)) == b"a" * PS
        assert (counters.gets - gets, counters.scans - scans) == (1, 1)
        await device.stop()
        await device.store.close()

    asyncio.run(body())


def test_a_cancelled_drain_keeps_its_blocks() -> None:
    """A drain cancelled half-way (shutdown, a stuck store) must leave its
    acknowledged blocks in the write-back buffer: once they were dropped, a
    later partial write was applied over a stale cached copy and the
    earlier write was lost (DST seed 40177)."""

    async def body() -> None:
        device = await open_device(8)
        await device.stop()  # no background writeback: this test drains by hand
        assert bytes(await device.read(0, BS)) == bytes(BS)  # cached as a hole
        await device.write(0, memoryview(b"e" * 1000))  # a partial write: RMW over the hole
        drain = asyncio.ensure_future(device._drain())
        for _ in range(3):
            await asyncio.sleep(0)  # into the drain's store calls
        drain.cancel()
        with pytest.raises(asyncio.CancelledError):
            await drain
        await device.write(38, memoryview(b"l" * 962))  # a later write to the same block
        assert bytes(await device.read(0, 1000)) == b"e" * 38 + b"l" * 962
        assert await device._drain()
        twin = uncached_twin(device)
        assert bytes(await twin.read(0, 1000)) == b"e" * 38 + b"l" * 962
        await device.store.close()

    asyncio.run(body())
