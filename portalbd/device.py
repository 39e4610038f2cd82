"""Block device semantics on top of a key-value store.

The device turns byte-range operations into block-keyed store operations.
It knows nothing of NBD or sockets, and it is where performance is won:
every byte that crosses into SlateDB is copied one element at a time by the
binding, and every awaited call costs tens of microseconds, so the device
keeps two bounded maps in front of the store:

* a write-back buffer of dirty blocks (``dirty``), drained to the store in
  large batches by a background task, by FLUSH, and by FUA writes;
* an LRU cache of clean blocks (``clean``), whose contents equal what the
  store durably holds.

While a drain is under way its blocks sit in ``draining`` until the batch is
in the store *and* flushed, so every lookup goes dirty -> draining -> clean
-> store and always sees the newest acknowledged data.

A dirty or draining entry is a whole block (``bytes``/``bytearray``; the
empty ``bytes`` is a hole) or, in format 2, a :class:`~portalbd.pages.Pages`:
the pages of a block that were written without its old contents being read.
Those drain as page deltas (see ``pages.py``), so a 4 KiB write into an
unread 64 KiB block never moves 64 KiB through the binding.

Correctness rules kept here:
* Partial-page updates are read-modify-write; a block is loaded at most once
  at a time, and writers that need its contents wait for the load, so two
  writers to different parts of one block never lose either part.
* A value loaded from the store is used only while no drain has written
  that block since the load began (``_written_since``).
* FLUSH returns only after every write acknowledged before it is in the
  store and the store has flushed its WAL. Concurrent flushes share rounds,
  and a round shares the WAL flush of a drain that already holds every
  write acknowledged before it (``_durable_gen``).
* A background drain puts its blocks into the store at once but flushes the
  WAL only after ``writeback_delay`` or when asked (a FLUSH, a full
  buffer): a FLUSH that follows a write then waits for one WAL flush, not
  for the write's batch to cross the binding too, and writes that need no
  FLUSH still cost one WAL flush per ``writeback_delay``.
* Memory is bounded: writers wait while dirty + draining exceed the limit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

from portalbd.allocation import AllocationMap
from portalbd.baseonly import BaseOnlyBlocks
from portalbd.blockmath import Piece, pieces
from portalbd.nbd.wire import STATE_HOLE, STATE_ZERO  # block status speaks NBD's flags
from portalbd.pages import (
    Layout,
    Pages,
    Payload,
    aligned,
    base_key,
    compose,
    delta_key,
    delta_pages,
    group_by_block,
    mask_pages,
    merge_stored,
    page_span,
    split_batches,
    stored_flags,
)
from portalbd.statusmap import StatusMap
from portalbd.store import envelope
from portalbd.store.items import DELETE
from portalbd.store.sealing import Sealer
from portalbd.store.slate import SlateHandle, StoreError

HOLE = b""  # a block that reads as zeros and is absent from the store
SPARSE_TRIM_BLOCKS = 64  # a discard this large first asks the store what exists
STATUS_SCAN_ENTRIES = 1024  # stored entries one BLOCK_STATUS scan reads at most
STATUS_SCANS = 8  # scans one BLOCK_STATUS request may make
DRAIN_LOG = 32  # recent drains remembered to tell whether a loaded value is stale
STORED_DELTAS_MAX = 1 << 16  # blocks whose stored delta keys are remembered (~6 MiB)
_HOLE_COST = 64  # what a cached hole costs in memory, roughly
_PAGES_COST = 256  # a Pages entry beside its page buffers, roughly
STOP_WAIT_S = 5.0  # how long stop() waits for the background writer to end

Block = bytes | bytearray
Entry = bytes | bytearray | Pages


class DeviceError(Exception):
    """An operation failed; the NBD layer reports it as EIO."""


@dataclass(slots=True)
class DeviceCounters:
    flushes: int = 0
    flush_ns_total: int = 0
    drains: int = 0
    drained_blocks: int = 0
    drained_pages: int = 0
    loads: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_written: int = 0  # client bytes accepted by WRITE
    deltas_deleted: int = 0  # delta keys removed under a newer base


class _Load:
    """A block being read from the store; others wait on ``done``."""

    __slots__ = ("done", "stale", "value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.stale = False  # a drain wrote this block while we were reading it
        self.value: bytes | None = None


def _runs(blocks: Sequence[int]) -> Iterator[list[int]]:
    """Split sorted block numbers into runs of consecutive ones."""
    run: list[int] = []
    for block in blocks:
        if run and block != run[-1] + 1:
            yield run
            run = []
        run.append(block)
    if run:
        yield run


def _stack_over(older: Entry, newer: Pages, block_size: int) -> Entry:
    """``newer`` pages written over ``older`` (put back after a failed drain)."""
    if isinstance(older, Pages):
        merged = older.under(newer)
        return merged.block() if merged.full else merged
    return compose(older, [newer], block_size)


class Device:
    def __init__(
        self,
        store: SlateHandle,
        *,
        size: int,
        block_size: int,
        cache_bytes: int,
        dirty_bytes: int,
        writeback_delay: float = 0.25,
        batch_bytes: int = 4 * 1024 * 1024,
        on_flush: Callable[[int], None] | None = None,
        layout: Layout | None = None,
        sealer: Sealer | None = None,
        follows_store: bool = False,
    ) -> None:
        self.store = store
        # Another daemon writes the store (a read replica): nothing read
        # stays true, so no block is remembered as base-only.
        self.follows_store = follows_store
        self.size = size
        self.block_size = block_size
        self.layout = layout or Layout()
        if self.layout.sealed != (sealer is not None):
            raise ValueError(f"format {self.layout.version} disks are sealed iff a sealer is given")
        # An encrypted disk (format 3): every value is sealed on the worker
        # threads that build batches and unsealed where it is decoded.
        self.sealer = sealer
        self.page_size = min(self.layout.page_size, block_size)
        # Page deltas only pay when a block holds several pages.
        self._deltas = self.layout.deltas and self.page_size < block_size
        self._scan_run = 2 if self.layout.deltas else 4
        # blocks a get can load (no deltas newer than the base): baseonly.py
        self._base_only = BaseOnlyBlocks()
        # Delta keys the store may hold, per block (a bitmask of pages; a
        # superset is harmless): a drain writing the block whole deletes
        # them in the same batch, so scans stop returning shadowed deltas.
        self._stored_deltas: dict[int, int] = {}
        # block status of scanned stretches of the store (statusmap.py);
        # off when another daemon writes the store
        self._status = StatusMap(max_groups=0 if follows_store else 1024)
        self.cache_limit = cache_bytes
        self.dirty_limit = dirty_bytes
        self.writeback_delay = writeback_delay
        self.batch_bytes = batch_bytes
        self.counters = DeviceCounters()
        self._on_flush = on_flush
        self._zero_block = bytes(block_size)
        self._zeros = memoryview(self._zero_block)
        self._dirty: dict[int, Entry] = {}
        self._draining: dict[int, Entry] = {}
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self.dirty_bytes = 0
        self.draining_bytes = 0
        self.cached_bytes = 0
        self._loading: dict[int, _Load] = {}
        self._drain_lock = asyncio.Lock()
        self._drains_done = 0  # changes whenever the store may hold newer blocks
        self._drain_log: deque[tuple[int, frozenset[int]]] = deque(maxlen=DRAIN_LOG)
        self._seq = self.layout.epoch << 40
        self._room = asyncio.Event()
        self._room.set()
        self._wake_writeback = asyncio.Event()
        # Wakes a background drain that holds its WAL flush back when
        # someone waits for durability (_must_flush says who).
        self._flush_wanted = asyncio.Event()
        # Generations: every change applied in memory counts one; a drain
        # that succeeds makes every change counted before it took the dirty
        # blocks durable. Drains run one at a time and a failed one puts its
        # blocks back, so the last successful drain's count is a floor.
        self._write_gen = 0
        self._durable_gen = 0
        self._next_round: asyncio.Future[None] | None = None
        self._flush_runner: asyncio.Task[None] | None = None
        self._writeback_task: asyncio.Task[None] | None = None
        self._first_dirty_at = 0.0
        self._drain_error: str | None = None  # the last background drain failed
        # Told which blocks each drain made data or holes (allocation.py), if anyone counts.
        self.allocation: AllocationMap | None = None

    # --- lifecycle ------------------------------------------------------

    def start(self) -> None:
        if self._writeback_task is None:
            self._writeback_task = asyncio.get_running_loop().create_task(
                self._writeback_loop(), name="portalbd-writeback"
            )

    async def stop(self) -> None:
        """Drain and flush everything, then stop the background writer."""
        try:
            await self.flush()
        finally:
            if self._writeback_task is not None:
                # A drain stuck in a store call that ignores cancellation
                # (seen on a full disk) must not hold shutdown forever.
                self._writeback_task.cancel()
                await asyncio.wait({self._writeback_task}, timeout=STOP_WAIT_S)
                self._writeback_task = None

    def swap_store(self, store: SlateHandle) -> None:
        """Serve from another database (after a restore); caches start empty.

        The caller has flushed and stopped all I/O, so nothing is dirty.
        """
        if self._dirty or self._draining or self._loading:
            raise DeviceError("cannot swap storage with I/O in flight")
        self.store = store
        self.forget_clean_cache()
        self._base_only.clear()
        self._stored_deltas.clear()
        self._status.clear()
        self._drains_done += 1  # values loaded from the old store are void
        self._drain_log.clear()

    def forget_clean_cache(self) -> None:
        """Drop cached clean blocks (after a restore, or a reopened store)."""
        self._clean.clear()
        self.cached_bytes = 0
        self._status.clear()

    # --- lookups ---------------------------------------------------------

    def _lookup(self, block: int, loaded: dict[int, bytes] | None = None) -> Block | None:
        """The block's current contents, or None when the store must be asked.

        ``loaded`` holds values read from the store that are still current.
        """
        top = self._dirty.get(block)
        if top is not None and not isinstance(top, Pages):
            return top
        below = self._draining.get(block)
        if top is None and below is not None and not isinstance(below, Pages):
            return below
        layers: list[Pages] = []
        if top is not None:
            layers.append(top)
        base: Block | None = None
        if below is not None:
            if isinstance(below, Pages):
                layers.append(below)
            else:
                base = below
        if base is None:
            base = self._clean.get(block)
            if base is not None:
                self._clean.move_to_end(block)
                self.counters.cache_hits += 1
            elif loaded is not None:
                base = loaded.get(block)
            if base is None:
                return None
        if not layers:
            return base
        layers.reverse()
        return compose(base, layers, self.block_size)

    def _known(self, block: int, loaded: dict[int, bytes] | None = None) -> bool:
        """Whether :meth:`_lookup` would answer without the store (no copies)."""
        for entries in (self._dirty, self._draining):
            value = entries.get(block)
            if value is not None and not isinstance(value, Pages):
                return True
        return block in self._clean or (loaded is not None and block in loaded)

    def _pages_copy(self, out: memoryview, piece: Piece) -> bool:
        """Fill a piece from written pages alone, if they cover all of it."""
        layers = [
            entry
            for entry in (self._dirty.get(piece.block), self._draining.get(piece.block))
            if isinstance(entry, Pages)
        ]
        if not layers:
            return False
        ps = self.page_size
        first, stop = page_span(piece.start, piece.end, ps)
        for page in range(first, stop):
            for layer in layers:
                if layer.has_page(page):
                    lo = max(piece.start, page * ps)
                    hi = min(piece.end, (page + 1) * ps)
                    dst = piece.offset + lo - piece.start
                    held = layer.page(page)
                    out[dst : dst + hi - lo] = held[lo - page * ps : hi - page * ps]
                    break
            else:
                return False
        return True

    def _remember(self, block: int, value: bytes) -> None:
        """Put a block the store holds into the clean cache, evicting LRU."""
        if self.cache_limit <= 0:
            return
        cost = len(value) or _HOLE_COST
        old = self._clean.pop(block, None)
        if old is not None:
            self.cached_bytes -= len(old) or _HOLE_COST
        self._clean[block] = value
        self.cached_bytes += cost
        while self.cached_bytes > self.cache_limit and self._clean:
            _, evicted = self._clean.popitem(last=False)
            self.cached_bytes -= len(evicted) or _HOLE_COST

    def _forget(self, block: int) -> None:
        old = self._clean.pop(block, None)
        if old is not None:
            self.cached_bytes -= len(old) or _HOLE_COST

    def _written_since(self, block: int, since: int) -> bool:
        """Whether a drain finished after ``since`` may have written ``block``."""
        if since == self._drains_done:
            return False
        if not self._drain_log or self._drain_log[0][0] > since + 1:
            return True  # older than what the log remembers: assume so
        return any(number > since and block in blocks for number, blocks in self._drain_log)

    def _current(self, loaded: dict[int, tuple[int, bytes]]) -> dict[int, bytes]:
        """The loaded values no drain has overtaken since they were read."""
        return {b: v for b, (since, v) in loaded.items() if not self._written_since(b, since)}

    # --- loading -------------------------------------------------------------

    def _decode(self, block: int, entries: Sequence[tuple[bytes, bytes]]) -> bytes:
        """One block's contents from its stored entries (base and deltas)."""
        try:
            if self.layout.deltas:
                value, _ = merge_stored(entries, self.block_size, self.page_size, self.sealer)
                return value
        except ValueError as exc:
            raise DeviceError(f"block {block} cannot be decoded: {exc}") from exc
        if not entries:
            return HOLE
        raw = entries[0][1]
        if len(entries) != 1 or len(raw) != self.block_size:
            raise DeviceError(
                f"block {block} holds {len(raw)} bytes, expected {self.block_size} (format 1)"
            )
        return raw

    def _stored_flags(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        """NBD status flags of a stored block, without decompressing it."""
        if self.layout.deltas:
            try:
                codec = stored_flags(entries, sealed=self.sealer is not None)
            except ValueError as exc:
                raise DeviceError(f"block status: {exc}") from exc
            if codec == envelope.CODEC_HOLE:
                return STATE_HOLE | STATE_ZERO
            return STATE_ZERO if codec == envelope.CODEC_ZERO else 0
        return STATE_ZERO if entries[0][1] == self._zero_block else 0

    def _note_deltas(self, block: int, mask: int) -> None:
        """Remember delta keys the store holds for ``block`` (bits add up)."""
        if not mask:
            return
        known = self._stored_deltas.get(block)
        if known is not None:
            self._stored_deltas[block] = known | mask
        elif len(self._stored_deltas) < STORED_DELTAS_MAX:
            self._stored_deltas[block] = mask

    def stored_allocated(self, entries: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether a stored block is allocated (data or allocated zeros), not a hole."""
        return not self._stored_flags(entries) & STATE_HOLE

    def _loaded(self, block: int, load: _Load, value: bytes) -> None:
        """A load finished: cache its value, or lift dirty pages onto it."""
        load.value = value
        if load.stale:
            return
        top = self._dirty.get(block)
        if top is None and block not in self._draining:
            self._remember(block, value)
        elif isinstance(top, Pages):
            # Writers put pages over a block nobody had read; now that its
            # base is known, keep the whole block so reads need no merge.
            below = self._draining.get(block)
            base: Block = value
            layers = [top]
            if isinstance(below, Pages):
                layers.insert(0, below)
            elif below is not None:
                base = below
            self._set_dirty(block, compose(base, layers, self.block_size))

    async def _load(self, block: int) -> bytes | None:
        """Read one block from the store (once, however many ask).

        Returns its value (HOLE for an absent block), or None when a drain
        overtook the read and the value may be stale: the caller looks again.
        """
        pending = self._loading.get(block)
        if pending is not None:
            await asyncio.shield(pending.done)
            return None if pending.stale else pending.value
        load = _Load(asyncio.get_running_loop())
        self._loading[block] = load
        self.counters.loads += 1
        self.counters.cache_misses += 1
        drains_started = self._seq
        try:
            if self._deltas and block not in self._base_only:
                found = await self.store.scan(base_key(block), base_key(block + 1))
                self._note_scanned(block, found, load, drains_started)
            else:
                raw = await self.store.get(base_key(block))
                found = [] if raw is None else [(base_key(block), raw)]
            self._loaded(block, load, self._decode(block, found))
        except (StoreError, DeviceError) as exc:
            error = exc if isinstance(exc, DeviceError) else DeviceError(str(exc))
            load.done.set_exception(error)
            load.done.exception()  # mark retrieved; waiters get it via shield
            raise error from exc
        finally:
            del self._loading[block]
            if not load.done.done():
                load.done.set_result(None)
        return None if load.stale else load.value

    def _note_scanned(
        self,
        block: int,
        entries: Sequence[tuple[bytes, bytes]],
        load: _Load,
        drains_started: int,
    ) -> None:
        """What a scan of one block tells: its delta keys, and whether it has none.

        The delta keys are remembered whatever happened meanwhile (a superset
        is harmless). A block with none may later load with a get, but only
        when no drain started meanwhile and none overtook the load: a drain
        writing deltas for the block may have committed after the scan's
        snapshot (a drain also forgets its delta blocks when it ends).
        """
        self._note_deltas(block, delta_pages(entries))
        if load.stale or self._seq != drains_started or self.follows_store:
            return
        if len(entries) <= 1 and all(key == base_key(block) for key, _ in entries):
            self._base_only.add(block)

    async def _load_all(self, blocks: Sequence[int]) -> dict[int, bytes]:
        """Load several blocks at once; returns those that are not stale.

        Runs of consecutive blocks are read with one range scan (far cheaper
        per block than a call each); the rest with concurrent calls.
        """
        if len(blocks) == 1:
            value = await self._load(blocks[0])
            return {} if value is None else {blocks[0]: value}
        jobs: list[Awaitable[dict[int, bytes]]] = []
        singles: list[int] = []
        for run in _runs(sorted(set(blocks))):
            if len(run) >= self._scan_run and not any(b in self._loading for b in run):
                jobs.append(self._load_run(run))
            else:
                singles.extend(run)
        if singles:
            jobs.append(self._load_singles(singles))
        results = await asyncio.gather(*jobs)
        merged: dict[int, bytes] = {}
        for result in results:
            merged.update(result)
        return merged

    async def _load_singles(self, blocks: Sequence[int]) -> dict[int, bytes]:
        values = await asyncio.gather(*(self._load(b) for b in blocks))
        return {b: v for b, v in zip(blocks, values, strict=True) if v is not None}

    async def _load_run(self, run: Sequence[int]) -> dict[int, bytes]:
        """Read consecutive blocks with one scan; absent keys are holes."""
        if any(b in self._loading for b in run):
            # Another caller started loading some of them after ours was
            # planned: share its loads instead of replacing them.
            return await self._load_singles(run)
        loop = asyncio.get_running_loop()
        loads = {b: _Load(loop) for b in run}
        self._loading.update(loads)
        self.counters.loads += len(run)
        self.counters.cache_misses += len(run)
        drains_started = self._seq
        try:
            found = await self.store.scan(base_key(run[0]), base_key(run[-1] + 1), sequential=True)
            groups = dict(group_by_block(found))
            for block, load in loads.items():
                entries = groups.get(block, ())
                self._note_scanned(block, entries, load, drains_started)
                self._loaded(block, load, self._decode(block, entries))
        except (StoreError, DeviceError) as exc:
            error = exc if isinstance(exc, DeviceError) else DeviceError(str(exc))
            for load in loads.values():
                load.done.set_exception(error)
                load.done.exception()
            raise error from exc
        finally:
            for block, load in loads.items():
                del self._loading[block]
                if not load.done.done():
                    load.done.set_result(None)
        return {
            b: load.value for b, load in loads.items() if not load.stale and load.value is not None
        }

    # --- reads -----------------------------------------------------------

    def _copy_piece(self, out: memoryview, piece: Piece, value: Block) -> None:
        target = out[piece.offset : piece.offset + piece.length]
        if not value:
            target[:] = self._zeros[: piece.length]
        else:
            target[:] = memoryview(value)[piece.start : piece.end]

    def read_nowait(self, offset: int, length: int) -> bytes | memoryview | None:
        """Answer a read from memory, or None when the store must be asked.

        The result is safe to hand to a transport: it never aliases a
        buffer that a later write could change.
        """
        bs = self.block_size
        block, start = divmod(offset, bs)
        if start + length <= bs:
            value = self._lookup(block)
            if value is None:
                out = bytearray(length)
                piece = Piece(block, start, start + length, 0)
                return memoryview(out) if self._pages_copy(memoryview(out), piece) else None
            if not value:
                return self._zeros[:length]
            if isinstance(value, bytearray):
                return bytes(value[start : start + length])
            return memoryview(value)[start : start + length]
        out = bytearray(length)
        view = memoryview(out)
        for piece in pieces(offset, length, bs):
            value = self._lookup(piece.block)
            if value is not None:
                self._copy_piece(view, piece, value)
            elif not self._pages_copy(view, piece):
                return None
        return view

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        result = self.read_nowait(offset, length)
        if result is not None:
            return result
        parts = list(pieces(offset, length, self.block_size))
        out = bytearray(length)
        view = memoryview(out)
        done = [False] * len(parts)
        while True:
            missing: list[int] = []
            for i, piece in enumerate(parts):
                if done[i]:
                    continue
                value = self._lookup(piece.block)
                if value is not None:
                    self._copy_piece(view, piece, value)
                elif not self._pages_copy(view, piece):
                    missing.append(piece.block)
                    continue
                done[i] = True
            if not missing:
                return view
            # A value read from the store is current only until a drain
            # writes its block: use the loads at once, and only those no
            # drain overtook.
            since = self._drains_done
            fresh = await self._load_all(missing)
            fresh = {b: v for b, v in fresh.items() if not self._written_since(b, since)}
            for i, piece in enumerate(parts):
                if not done[i] and piece.block in fresh:
                    value = self._lookup(piece.block, fresh)
                    if value is not None:
                        self._copy_piece(view, piece, value)
                        done[i] = True

    # --- writes ----------------------------------------------------------

    def _needs_load(self, piece: Piece, loaded: dict[int, bytes] | None = None) -> bool:
        """Whether applying ``piece`` needs the block's stored contents first.

        A block being loaded by someone else counts only while its contents
        are unknown: waiting on a load of a block that is already known would
        let writers chain each other's loads forever.
        """
        block = piece.block
        if piece.whole(self.block_size) or self._known(block, loaded):
            return False
        if self._deltas:
            if aligned(piece.start, piece.end, self.page_size):
                return False
            top = self._dirty.get(block)
            if isinstance(top, Pages) and top.covers(piece.start, piece.end):
                return False
        return True

    def _entry_cost(self, value: Entry) -> int:
        """What a dirty entry holds in memory: a hole or zero block almost nothing.

        Counting them as whole blocks made a large TRIM or WRITE_ZEROES fill
        the write-back buffer many times over with entries of a few bytes, and
        the next write waited for drains it did not need.
        """
        if isinstance(value, bytes) and (not value or value is self._zero_block):
            return _HOLE_COST
        if isinstance(value, Pages):
            return value.held_bytes + _PAGES_COST
        return self.block_size

    def _set_dirty(self, block: int, value: Entry) -> None:
        old = self._dirty.get(block)
        if old is None:
            if not self._dirty:
                self._first_dirty_at = time.monotonic()
                self._wake_writeback.set()
            self.dirty_bytes += self._entry_cost(value)
        else:
            self.dirty_bytes += self._entry_cost(value) - self._entry_cost(old)
        self._dirty[block] = value
        self._check_half_full()

    def _check_half_full(self) -> None:
        if self.dirty_bytes + self.draining_bytes >= self.dirty_limit // 2:
            self._flush_wanted.set()

    def _apply(
        self,
        piece: Piece,
        data: memoryview | None,
        explicit_zero: bool,
        loaded: dict[int, bytes] | None = None,
    ) -> None:
        """Change one block in memory; ``data`` None means zeros."""
        self._write_gen += 1
        bs = self.block_size
        block = piece.block
        if piece.whole(bs):
            if data is None:
                value: Entry = self._zero_block if explicit_zero else HOLE
            else:
                value = bytes(data[piece.offset : piece.offset + bs])
                if value == self._zero_block:
                    value = HOLE
            self._set_dirty(block, value)
            return
        chunk = None if data is None else data[piece.offset : piece.offset + piece.length]
        current = self._dirty.get(block)
        if current is None and self._deltas and aligned(piece.start, piece.end, self.page_size):
            # Whole pages drain as deltas even when the block is cached: a
            # 4 KiB write then costs a 4 KiB put, not a 64 KiB one.
            current = Pages(bs, self.page_size)
            self._set_dirty(block, current)
        if isinstance(current, bytearray):
            current[piece.start : piece.end] = (
                self._zeros[: piece.length] if chunk is None else chunk
            )
            return
        if isinstance(current, Pages) and (
            aligned(piece.start, piece.end, self.page_size)
            or current.covers(piece.start, piece.end)
        ):
            held = current.held_bytes
            current.put(piece.start, piece.end, chunk)
            # changed in place: the buffer's bytes follow (see _entry_cost)
            self.dirty_bytes += current.held_bytes - held
            if current.full:
                self._set_dirty(block, current.block())
            else:
                self._check_half_full()
            return
        base = self._lookup(block, loaded)
        if base is None:
            assert self._deltas and current is None, "partial update of an unloaded block"
            pages = Pages(bs, self.page_size)
            pages.put(piece.start, piece.end, chunk)
            self._set_dirty(block, pages.block() if pages.full else pages)
            return
        if isinstance(base, bytearray):  # composed just now: ours to change
            buf = base
        elif base:
            buf = bytearray(base)
        else:
            buf = bytearray(bs)
        buf[piece.start : piece.end] = self._zeros[: piece.length] if chunk is None else chunk
        self._set_dirty(block, buf)

    def _has_room(self) -> bool:
        return self.dirty_bytes + self.draining_bytes < self.dirty_limit

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        """Apply a write in memory if that needs no store read and no waiting."""
        if not self._has_room():
            return False
        parts = list(pieces(offset, len(data), self.block_size))
        for piece in parts:
            if self._needs_load(piece):
                return False
        for piece in parts:
            self._apply(piece, data, False)
        self.counters.bytes_written += len(data)
        return True

    async def _modify(
        self, offset: int, length: int, data: memoryview | None, explicit_zero: bool = False
    ) -> None:
        while not self._has_room():
            if self._drain_error is not None:
                raise DeviceError(f"write buffer full and storage failing: {self._drain_error}")
            self._room.clear()
            self._wake_writeback.set()
            self._flush_wanted.set()
            await self._room.wait()
        parts = list(pieces(offset, length, self.block_size))
        if data is None and not explicit_zero:
            whole = [p.block for p in parts if p.whole(self.block_size)]
            if len(whole) >= SPARSE_TRIM_BLOCKS:
                absent = await self._absent_blocks(whole)
                if absent:
                    parts = [p for p in parts if p.block not in absent]
        loaded: dict[int, tuple[int, bytes]] = {}
        while True:
            current = self._current(loaded)
            missing = [p.block for p in parts if self._needs_load(p, current)]
            if not missing:
                break
            since = self._drains_done
            fresh = await self._load_all(missing)
            loaded.update((b, (since, v)) for b, v in fresh.items())
        for piece in parts:
            self._apply(piece, data, explicit_zero, current)
        if data is not None:
            self.counters.bytes_written += length

    async def _absent_blocks(self, blocks: Sequence[int], chunk: int = 64) -> set[int]:
        """Blocks of a large discard that are holes already (nothing to write).

        A fresh or sparse disk is mostly holes, and discarding a block that
        is not there still costs a write each. Ask the store in chunks; once
        a chunk turns out dense, stop asking (reading data just to discard
        it costs more than discarding blindly).
        """
        drains = self._drains_done
        absent: set[int] = set()
        for i in range(0, len(blocks), chunk):
            part = blocks[i : i + chunk]
            found = await self.store.scan(base_key(part[0]), base_key(part[-1] + 1))
            present = {
                block
                for block, entries in group_by_block(found)
                if self._stored_flags(entries) != STATE_HOLE | STATE_ZERO
            }
            absent.update(b for b in part if b not in present)
            if len(present) > chunk // 4:
                break
        if self._drains_done != drains:
            return set()  # a drain raced the scan: its view may be old
        absent = {b for b in absent if b not in self._dirty and b not in self._draining}
        for block in absent:
            if block not in self._loading and block not in self._clean:
                self._remember(block, HOLE)
        return absent

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self._modify(offset, len(data), data)
        if fua:
            await self.flush()

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, no_hole: bool = False
    ) -> None:
        await self._modify(offset, length, None, explicit_zero=no_hole)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range. Only whole blocks become holes: the bytes around
        an unaligned range are untouched, and the trimmed part reads as zeros."""
        await self._modify(offset, length, None)
        if fua:
            await self.flush()

    async def cache(self, offset: int, length: int, max_blocks: int = 256) -> None:
        """Prefetch a range into the clean cache (bounded per request)."""
        wanted = [
            p.block for p in pieces(offset, length, self.block_size) if not self._known(p.block)
        ][:max_blocks]
        if wanted:
            await self._load_all(wanted)

    # --- block status ------------------------------------------------------

    def _memory_flags(self, block: int) -> int | None:
        """Status of a block from memory alone, or None if only the store knows."""
        value = self._lookup(block)
        if value is None:
            if isinstance(self._dirty.get(block), Pages) or isinstance(
                self._draining.get(block), Pages
            ):
                return 0  # some pages written: data (a safe answer)
            return None
        return self._entry_flags(value)

    def _entry_flags(self, entry: Entry) -> int:
        """Status flags of a block's entry in memory (pages: data, the safe answer)."""
        if isinstance(entry, Pages):
            return 0
        if not entry:
            return STATE_HOLE | STATE_ZERO
        return STATE_ZERO if entry == self._zero_block else 0

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents from ``offset``; may cover only a prefix.

        A run of blocks the store does not hold, however long, costs one
        range scan: the scan returns the next stored entries, and everything
        before them that memory does not override is a hole. What scans
        found is kept (statusmap.py), so stretches already scanned are
        answered without reading their values through the binding again.
        """
        bs = self.block_size
        end = offset + length
        last_block = (end - 1) // bs
        extents: list[tuple[int, int]] = []
        position = offset

        def emit_until(limit: int, flags: int) -> None:
            nonlocal position
            count = min(end, limit) - position
            if count <= 0:
                return
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + count, flags)
            else:
                extents.append((count, flags))
            position += count

        scans = 0
        status = self._status
        in_memory: list[int] | None = None  # dirty and draining blocks, until the next await
        while position < end:
            block = position // bs
            flags = self._memory_flags(block)
            if flags is not None:
                emit_until((block + 1) * bs, flags)
                continue
            run = status.run(block, last_block + 1)
            if run is not None:
                # Scanned before: the run ends at its end or at the next block
                # memory holds (clean blocks equal what the store holds).
                flags, stop = run
                if in_memory is None:
                    in_memory = sorted(chain(self._dirty, self._draining))
                i = bisect.bisect_right(in_memory, block)
                if i < len(in_memory):
                    stop = min(stop, in_memory[i])
                emit_until(stop * bs, flags)
                continue
            if scans == STATUS_SCANS:
                break
            scans += 1
            # From where this block's group is known up to (so coverage grows
            # contiguously), until the next group already known.
            scan_from = status.scan_start(block)
            scan_end = last_block + 1
            following = status.next_known(block)
            if following is not None:
                scan_end = min(scan_end, following)
            since = self._drains_done
            found = await self.store.scan(
                base_key(scan_from), base_key(scan_end), limit=STATUS_SCAN_ENTRIES
            )
            in_memory = None
            if self._drains_done != since:
                continue  # a drain moved blocks from memory into the store meanwhile
            groups = list(group_by_block(found))
            scanned_to = scan_end
            if len(found) == STATUS_SCAN_ENTRIES and len(groups) > 1:
                scanned_to = groups[-1][0]  # the last block may have more entries
                groups.pop()
            stored = {b: entries for b, entries in groups}
            status.learn(scan_from, scanned_to, {b: self._stored_flags(e) for b, e in groups})
            overrides = {b for b in chain(self._dirty, self._draining) if block <= b < scanned_to}
            for b in sorted(overrides | {b for b in stored if b >= block}):
                emit_until(b * bs, STATE_HOLE | STATE_ZERO)
                known = self._memory_flags(b)
                if known is None:
                    entries = stored.get(b)
                    known = (
                        STATE_HOLE | STATE_ZERO if entries is None else self._stored_flags(entries)
                    )
                emit_until((b + 1) * bs, known)
            emit_until(scanned_to * bs, STATE_HOLE | STATE_ZERO)
        return extents

    # --- write-back and flush ----------------------------------------------

    def _drain_items(
        self, draining: dict[int, Entry]
    ) -> tuple[list[tuple[bytes, Payload]], list[tuple[int, bytes]]]:
        """The store items of a drain, and the whole blocks it makes clean.

        A whole block's known delta keys are deleted right after its base,
        in the same batch (``split_batches`` keeps a block's keys together):
        they are shadowed by the new base, so deleting them changes nothing
        but what later scans must step over. No newer delta can exist: a
        block appears once per drain and drains run one at a time.
        """
        items: list[tuple[bytes, Payload]] = []
        whole: list[tuple[int, bytes]] = []
        for block in sorted(draining):
            value = draining[block]
            if isinstance(value, Pages):
                for page in value.pages():
                    items.append((delta_key(block, page), memoryview(value.page(page))))
                self.counters.drained_pages += bin(value.mask).count("1")
                # Noted before the write: if it fails halfway they may exist.
                self._note_deltas(block, value.mask)
                continue
            if isinstance(value, bytearray):
                value = bytes(value)
                draining[block] = value
            whole.append((block, value))
            items.append((base_key(block), value if value else None))
            stale = self._stored_deltas.get(block, 0)
            items.extend((delta_key(block, page), DELETE) for page in mask_pages(stale))
        return items, whole

    def _forget_base_only(self, draining: dict[int, Entry]) -> None:
        """Blocks this drain writes deltas for need a scan again."""
        for block, entry in draining.items():
            if isinstance(entry, Pages):
                self._base_only.discard(block)

    def _put_back(self, draining: dict[int, Entry]) -> None:
        """A drain failed: its blocks become dirty again under newer writes."""
        for block, value in draining.items():
            newer = self._dirty.get(block)
            if newer is None:
                self._set_dirty(block, value)
            elif isinstance(newer, Pages):
                self._set_dirty(block, _stack_over(value, newer, self.block_size))

    def _must_flush(self) -> bool:
        """Whether someone waits for durability: a FLUSH (or FUA, or stop)
        pending or under way, or a buffer half full (writers may wait)."""
        runner = self._flush_runner
        if runner is not None and not runner.done():
            return True
        return self.dirty_bytes + self.draining_bytes >= self.dirty_limit // 2

    async def _hold_flush(self, until: float) -> None:
        """Wait until ``until`` (monotonic) unless someone needs durability first."""
        while not self._must_flush():
            delay = until - time.monotonic()
            if delay <= 0:
                return
            self._flush_wanted.clear()
            if self._must_flush():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), delay)

    async def _drain(self, *, hold: bool = False) -> bool:
        """Move every dirty block into the store, in batches, durably.

        With ``hold`` (a background drain) the batches go in at once and the
        WAL flush waits until the oldest block has waited ``writeback_delay``,
        or until someone needs durability (:meth:`_must_flush`). Returns
        whether it wrote (and so flushed) anything.
        """
        async with self._drain_lock:
            if not self._dirty:
                return False
            covers = self._write_gen
            hold_until = self._first_dirty_at + self.writeback_delay if hold else None
            draining = self._dirty
            self._dirty = {}
            self._draining = draining
            self.draining_bytes = self.dirty_bytes
            self.dirty_bytes = 0
            self._seq += 1
            self._forget_base_only(draining)
            items, whole = self._drain_items(draining)
            encode = None
            if self.layout.deltas:
                encode = functools.partial(
                    envelope.encode,
                    seq=self._seq,
                    compress=self.layout.compress,
                    seal=self.sealer,
                )
            try:
                # Each key appears once per drain, so batches commute: keep as
                # many in flight as the store has threads to build them.
                batches = split_batches(items, self.batch_bytes)
                width = self.store.parallelism
                if len(batches) == 1:
                    # the common small drain (a commit's few pages): no task
                    # for gather to wrap it in, no extra pass of the loop
                    await self.store.write(batches[0], encode=encode)
                    batches = []
                for i in range(0, len(batches), width):
                    group = batches[i : i + width]
                    results = await asyncio.gather(
                        *(self.store.write(batch, encode=encode) for batch in group),
                        return_exceptions=True,
                    )
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                if hold_until is not None:
                    await self._hold_flush(hold_until)
                # The blocks leave ``draining`` only once durable: a database
                # reopened after an outage has lost whatever was in its
                # memtable, so until this flush succeeds the only safe copy
                # of an acknowledged write is ours.
                await self.store.flush()
                self._durable_gen = covers
            except BaseException:
                # A failed drain, and a cancelled one too (shutdown, a stuck
                # store): its blocks are acknowledged writes, and outside
                # dirty and draining a later write would be applied over a
                # stale cached copy.
                self._draining = {}
                self.draining_bytes = 0
                self._put_back(draining)
                raise
            finally:
                self._forget_base_only(draining)
                self._drains_done += 1
                self._drain_log.append((self._drains_done, frozenset(draining)))
                self._draining = {}
                self.draining_bytes = 0
                self._room.set()
            self.counters.drains += 1
            self.counters.drained_blocks += len(draining)
            allocation = self.allocation
            for block, entry in draining.items():
                flags = self._entry_flags(entry)
                self._status.note(block, flags)
                if allocation is not None:  # holes are not allocated; zeros are
                    allocation.drained(block, not flags & STATE_HOLE)
                load = self._loading.get(block)
                if load is not None:
                    load.stale = True
                if isinstance(entry, Pages):
                    # The store now holds base + deltas: keep a cached base
                    # current rather than dropping it.
                    cached = self._clean.get(block)
                    if cached is not None and self._dirty.get(block) is None:
                        self._remember(block, bytes(compose(cached, [entry], self.block_size)))
                    else:
                        self._forget(block)
            for block, value in whole:
                # The store now holds this block as a base newer than any of
                # its deltas, and none of the deltas it knew of: a get loads it.
                self._base_only.add(block)
                stale = self._stored_deltas.pop(block, 0)
                self.counters.deltas_deleted += bin(stale).count("1")
                # Cache it unless a newer whole value shadows it (pages
                # written since sit on top).
                if not isinstance(self._dirty.get(block), bytes | bytearray):
                    self._remember(block, value)
            return True

    async def flush(self) -> None:
        """Make every write acknowledged before this call durable.

        Callers that arrive while a round is running wait for the next one,
        which starts after them; one round serves all who wait on it.
        """
        self._flush_wanted.set()
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        waiter = self._next_round
        if self._flush_runner is None or self._flush_runner.done():
            self._flush_runner = asyncio.get_running_loop().create_task(self._run_flush_rounds())
        await asyncio.shield(waiter)

    async def _run_flush_rounds(self) -> None:
        while self._next_round is not None:
            round_future = self._next_round
            self._next_round = None
            started = time.monotonic_ns()
            # Every waiter of this round arrived before now.
            target = self._write_gen
            try:
                # Nothing left dirty and every change up to ``target``
                # durable (a drain that was under way when this round began
                # flushed them): answered without another WAL flush.
                if not await self._drain() and self._durable_gen < target:
                    await self.store.flush()
                    self._durable_gen = max(self._durable_gen, target)
                # The WAL flush survives the daemon; a power cut needs the
                # local disk synced too (file:// storage, store/localsync.py).
                await self.store.sync()
            except StoreError as exc:
                round_future.set_exception(DeviceError(str(exc)))
                round_future.exception()
                continue
            except BaseException as exc:  # cancellation at shutdown
                round_future.set_exception(DeviceError(f"flush interrupted: {exc!r}"))
                round_future.exception()
                raise
            elapsed = time.monotonic_ns() - started
            self._drain_error = None
            self.counters.flushes += 1
            self.counters.flush_ns_total += elapsed
            if self._on_flush is not None:
                self._on_flush(elapsed)
            round_future.set_result(None)

    async def _writeback_loop(self) -> None:
        """Drain in the background as soon as anything is dirty; the drain holds
        its WAL flush back until data has waited or someone needs it."""
        while True:
            if not self._dirty:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_writeback.wait(), self.writeback_delay)
            self._wake_writeback.clear()
            if not self._dirty:
                continue
            try:
                await self._drain(hold=True)
            except StoreError as exc:
                # Keep serving reads; FLUSH reports EIO, and writers that find
                # the buffer full get EIO instead of waiting forever. Retry
                # after a pause: the store may come back.
                self._drain_error = str(exc)
                self._room.set()
                await asyncio.sleep(min(1.0, self.writeback_delay * 4))
            else:
                self._drain_error = None
