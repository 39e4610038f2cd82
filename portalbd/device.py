"""Block device semantics on top of a key-value store.

The device turns byte-range operations into block-keyed store operations.
It knows nothing of NBD or sockets, and it is where performance is won:
every awaited call into SlateDB costs 80-300 us from Python, so the device
keeps two bounded maps in front of the store:

* a write-back buffer of dirty blocks (``dirty``), drained to the store in
  large batches by a background task, by FLUSH, and by FUA writes;
* an LRU cache of clean blocks (``clean``), whose contents equal what the
  store holds.

While a drain is under way its blocks sit in ``draining`` until the batch is
in the store, so every lookup goes dirty -> draining -> clean -> store and
always sees the newest acknowledged data.

A block absent from the store reads as zeros (the disk is sparse). In the
maps the empty ``bytes`` object stands for such a hole.

Correctness rules kept here:
* Partial-block updates are read-modify-write; a block is loaded at most
  once at a time, and writers to a block wait for its load, so two writers
  to different halves of one block never lose either half.
* FLUSH returns only after every write acknowledged before it is in the
  store and the store has flushed its WAL. Concurrent flushes share rounds.
* Memory is bounded: writers wait while dirty + draining exceed the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from portalbd.blockmath import Piece, block_key, key_block, pieces
from portalbd.store.slate import SlateHandle, StoreError

HOLE = b""  # a block that reads as zeros and is absent from the store
SCAN_RUN = 4  # consecutive missing blocks worth one range scan instead of gets
DRAIN_PARALLELISM = 3  # write batches in flight during a drain
SPARSE_TRIM_BLOCKS = 64  # a discard this large first asks the store what exists
_HOLE_COST = 64  # what a cached hole costs in memory, roughly

# The hole/zero flags of NBD's base:allocation context.
STATE_HOLE = 1
STATE_ZERO = 2

Block = bytes | bytearray


class DeviceError(Exception):
    """An operation failed; the NBD layer reports it as EIO."""


@dataclass(slots=True)
class DeviceCounters:
    flushes: int = 0
    flush_ns_total: int = 0
    drains: int = 0
    drained_blocks: int = 0
    loads: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


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
    ) -> None:
        self.store = store
        self.size = size
        self.block_size = block_size
        self.cache_limit = cache_bytes
        self.dirty_limit = dirty_bytes
        self.writeback_delay = writeback_delay
        self.batch_items = max(1, batch_bytes // block_size)
        self.counters = DeviceCounters()
        self._on_flush = on_flush
        self._zero_block = bytes(block_size)
        self._zeros = memoryview(self._zero_block)
        self._dirty: dict[int, Block] = {}
        self._draining: dict[int, Block] = {}
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self.dirty_bytes = 0
        self.draining_bytes = 0
        self.cached_bytes = 0
        self._loading: dict[int, _Load] = {}
        self._drain_lock = asyncio.Lock()
        self._drains_done = 0  # changes whenever the store may hold newer blocks
        self._room = asyncio.Event()
        self._room.set()
        self._wake_writeback = asyncio.Event()
        self._next_round: asyncio.Future[None] | None = None
        self._flush_runner: asyncio.Task[None] | None = None
        self._writeback_task: asyncio.Task[None] | None = None
        self._first_dirty_at = 0.0
        self._drain_error: str | None = None  # the last background drain failed

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
                self._writeback_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writeback_task
                self._writeback_task = None

    def swap_store(self, store: SlateHandle) -> None:
        """Serve from another database (after a restore); caches start empty.

        The caller has flushed and stopped all I/O, so nothing is dirty.
        """
        if self._dirty or self._draining or self._loading:
            raise DeviceError("cannot swap storage with I/O in flight")
        self.store = store
        self._clean.clear()
        self.cached_bytes = 0

    def forget_clean_cache(self) -> None:
        """Drop cached clean blocks: the store under them was reopened after a
        failure and may no longer hold what it acknowledged before."""
        self._clean.clear()
        self.cached_bytes = 0

    # --- lookups ---------------------------------------------------------

    def _lookup(self, block: int) -> Block | None:
        value = self._dirty.get(block)
        if value is not None:
            return value
        value = self._draining.get(block)
        if value is not None:
            return value
        clean = self._clean.get(block)
        if clean is not None:
            self._clean.move_to_end(block)
            self.counters.cache_hits += 1
        return clean

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

    async def _load(self, block: int) -> bytes | None:
        """Read one block from the store (once, however many ask).

        Returns its value (HOLE for an absent key), or None when a drain
        overtook the read and the value may be stale: the caller looks again.
        The value is also cached, so callers usually find it by lookup.
        """
        pending = self._loading.get(block)
        if pending is not None:
            await asyncio.shield(pending.done)
            return None if pending.stale else pending.value
        load = _Load(asyncio.get_running_loop())
        self._loading[block] = load
        self.counters.loads += 1
        self.counters.cache_misses += 1
        try:
            value = await self.store.get(block_key(block))
            load.value = HOLE if value is None else value
            if not load.stale and block not in self._dirty and block not in self._draining:
                self._remember(block, load.value)
        except StoreError as exc:
            load.done.set_exception(DeviceError(str(exc)))
            load.done.exception()  # mark retrieved; waiters get it via shield
            raise DeviceError(str(exc)) from exc
        finally:
            del self._loading[block]
            if not load.done.done():
                load.done.set_result(None)
        return None if load.stale else load.value

    async def _load_all(self, blocks: Sequence[int]) -> dict[int, bytes]:
        """Load several blocks at once; returns those that are not stale.

        Runs of consecutive blocks are read with one range scan (far cheaper
        per block than a get each); the rest with concurrent gets.
        """
        if len(blocks) == 1:
            value = await self._load(blocks[0])
            return {} if value is None else {blocks[0]: value}
        jobs: list[Awaitable[dict[int, bytes]]] = []
        singles: list[int] = []
        for run in _runs(sorted(blocks)):
            if len(run) >= SCAN_RUN and not any(b in self._loading for b in run):
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
        try:
            found = await self.store.scan(block_key(run[0]), block_key(run[-1] + 1))
            values = dict.fromkeys(run, HOLE)
            for key, value in found:
                values[key_block(key)] = value
            for block, value in values.items():
                load = loads[block]
                load.value = value
                if not load.stale and block not in self._dirty and block not in self._draining:
                    self._remember(block, value)
        except StoreError as exc:
            error = DeviceError(str(exc))
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
                return None
            if not value:
                return self._zeros[:length]
            if isinstance(value, bytearray):
                return bytes(value[start : start + length])
            return memoryview(value)[start : start + length]
        out = bytearray(length)
        view = memoryview(out)
        for piece in pieces(offset, length, bs):
            value = self._lookup(piece.block)
            if value is None:
                return None
            self._copy_piece(view, piece, value)
        return view

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        result = self.read_nowait(offset, length)
        if result is not None:
            return result
        parts = list(pieces(offset, length, self.block_size))
        loaded: dict[int, bytes] = {}
        while True:
            # Blocks loaded earlier stay usable even if the cache evicted
            # them meanwhile (a cache smaller than one request); a block a
            # drain overtook is simply loaded again.
            missing = [
                p.block for p in parts if p.block not in loaded and self._lookup(p.block) is None
            ]
            if missing:
                loaded.update(await self._load_all(missing))
            out = bytearray(length)
            view = memoryview(out)
            for piece in parts:
                value = self._lookup(piece.block)
                if value is None:
                    value = loaded.get(piece.block)
                    if value is None:
                        break
                self._copy_piece(view, piece, value)
            else:
                return view

    # --- writes ----------------------------------------------------------

    def _needs_load(self, piece: Piece, loaded: dict[int, bytes] | None = None) -> bool:
        if piece.block in self._loading:
            return True
        if piece.whole(self.block_size) or self._lookup(piece.block) is not None:
            return False
        return loaded is None or piece.block not in loaded

    def _set_dirty(self, block: int, value: Block) -> None:
        if block not in self._dirty:
            if not self._dirty:
                self._first_dirty_at = time.monotonic()
            self.dirty_bytes += self.block_size
            if self.dirty_bytes + self.draining_bytes >= self.dirty_limit // 2:
                self._wake_writeback.set()
        self._dirty[block] = value

    def _apply(
        self,
        piece: Piece,
        data: memoryview | None,
        explicit_zero: bool,
        loaded: dict[int, bytes] | None = None,
    ) -> None:
        """Change one block in memory; ``data`` None means zeros."""
        bs = self.block_size
        block = piece.block
        if piece.whole(bs):
            if data is None:
                value: Block = self._zero_block if explicit_zero else HOLE
            else:
                value = bytes(data[piece.offset : piece.offset + bs])
                if value == self._zero_block:
                    value = HOLE
            self._set_dirty(block, value)
            return
        current = self._dirty.get(block)
        if isinstance(current, bytearray):
            buf = current
        else:
            base = current if current is not None else self._lookup(block)
            if base is None and loaded is not None:
                base = loaded.get(block)
            assert base is not None, "partial update of a block that is not loaded"
            buf = bytearray(base) if base else bytearray(bs)
            self._set_dirty(block, buf)
        if data is None:
            buf[piece.start : piece.end] = self._zeros[: piece.length]
        else:
            buf[piece.start : piece.end] = data[piece.offset : piece.offset + piece.length]

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
        return True

    async def _modify(
        self, offset: int, length: int, data: memoryview | None, explicit_zero: bool = False
    ) -> None:
        while not self._has_room():
            if self._drain_error is not None:
                raise DeviceError(f"write buffer full and storage failing: {self._drain_error}")
            self._room.clear()
            self._wake_writeback.set()
            await self._room.wait()
        parts = list(pieces(offset, length, self.block_size))
        if data is None and not explicit_zero:
            whole = [p.block for p in parts if p.whole(self.block_size)]
            if len(whole) >= SPARSE_TRIM_BLOCKS:
                absent = await self._absent_blocks(whole)
                if absent:
                    parts = [p for p in parts if p.block not in absent]
        loaded: dict[int, bytes] = {}
        while True:
            missing = [p.block for p in parts if self._needs_load(p, loaded)]
            if not missing:
                break
            drains = self._drains_done
            fresh = await self._load_all(missing)
            if self._drains_done == drains:
                loaded.update(fresh)
            else:
                # A drain finished meanwhile: a value loaded before it may be
                # older than what that drain wrote. Load everything again.
                loaded = {}
        for piece in parts:
            self._apply(piece, data, explicit_zero, loaded)

    async def _absent_blocks(self, blocks: Sequence[int], chunk: int = 64) -> set[int]:
        """Blocks of a large discard that are holes already (nothing to delete).

        A fresh or sparse disk is mostly holes, and deleting keys that do not
        exist still costs a tombstone each. Ask the store in chunks; once a
        chunk turns out dense, stop asking (reading data just to delete it
        costs more than deleting blindly).
        """
        drains = self._drains_done
        absent: set[int] = set()
        for i in range(0, len(blocks), chunk):
            part = blocks[i : i + chunk]
            found = await self.store.scan(block_key(part[0]), block_key(part[-1] + 1))
            present = {key_block(key) for key, _ in found}
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
            p.block
            for p in pieces(offset, length, self.block_size)
            if self._lookup(p.block) is None
        ][:max_blocks]
        if wanted:
            await self._load_all(wanted)

    # --- block status ------------------------------------------------------

    async def block_status(
        self, offset: int, length: int, max_loads: int = 64
    ) -> list[tuple[int, int]]:
        """(length, flags) extents from ``offset``; may cover only a prefix."""
        all_pieces = list(pieces(offset, length, self.block_size))
        unknown = [p.block for p in all_pieces if self._lookup(p.block) is None][:max_loads]
        if unknown:
            await self._load_all(unknown)
        extents: list[tuple[int, int]] = []
        for piece in all_pieces:
            value = self._lookup(piece.block)
            if value is None:
                break  # not known yet: report the prefix we know
            if not value:
                flags = STATE_HOLE | STATE_ZERO
            elif value == self._zero_block:
                flags = STATE_ZERO
            else:
                flags = 0
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + piece.length, flags)
            else:
                extents.append((piece.length, flags))
        return extents

    # --- write-back and flush ----------------------------------------------

    async def _drain(self) -> bool:
        """Move every dirty block into the store, in batches, durably.

        Returns whether it wrote (and so flushed) anything.
        """
        async with self._drain_lock:
            if not self._dirty:
                return False
            draining = self._dirty
            self._dirty = {}
            self._draining = draining
            self.draining_bytes = self.dirty_bytes
            self.dirty_bytes = 0
            frozen: list[tuple[int, bytes]] = []
            for block in sorted(draining):
                value = draining[block]
                if isinstance(value, bytearray):
                    value = bytes(value)
                    draining[block] = value
                frozen.append((block, value))
            try:
                step = self.batch_items
                batches = [
                    [(block_key(b), v if v else None) for b, v in frozen[i : i + step]]
                    for i in range(0, len(frozen), step)
                ]
                # Each block appears once per drain, so batches commute: keep a
                # few in flight to overlap SlateDB's work with ours.
                for i in range(0, len(batches), DRAIN_PARALLELISM):
                    group = batches[i : i + DRAIN_PARALLELISM]
                    if len(group) == 1:
                        await self.store.write(group[0])
                    else:
                        results = await asyncio.gather(
                            *(self.store.write(batch) for batch in group), return_exceptions=True
                        )
                        for result in results:
                            if isinstance(result, BaseException):
                                raise result
                # The blocks leave ``draining`` only once durable: a database
                # reopened after an outage has lost whatever was in its
                # memtable, so until this flush succeeds the only safe copy
                # of an acknowledged write is ours.
                await self.store.flush()
            except StoreError:
                # Nothing is lost: put back what no newer write replaced.
                for block, value in frozen:
                    if block not in self._dirty:
                        self._dirty[block] = value
                        self.dirty_bytes += self.block_size
                raise
            finally:
                self._drains_done += 1
                self._draining = {}
                self.draining_bytes = 0
                self._room.set()
            self.counters.drains += 1
            self.counters.drained_blocks += len(frozen)
            for block, value in frozen:
                load = self._loading.get(block)
                if load is not None:
                    load.stale = True
                if block not in self._dirty:
                    self._remember(block, value)
            return True

    async def flush(self) -> None:
        """Make every write acknowledged before this call durable.

        Callers that arrive while a round is running wait for the next one,
        which starts after them; one round serves all who wait on it.
        """
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
            try:
                if not await self._drain():
                    await self.store.flush()
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
        """Drain in the background: when half full, or when data has waited."""
        while True:
            timeout = self.writeback_delay
            if self._dirty:
                age = time.monotonic() - self._first_dirty_at
                timeout = max(0.0, self.writeback_delay - age)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_writeback.wait(), timeout)
            self._wake_writeback.clear()
            if not self._dirty:
                continue
            try:
                await self._drain()
            except StoreError as exc:
                # Keep serving reads; FLUSH reports EIO, and writers that find
                # the buffer full get EIO instead of waiting forever. Retry
                # after a pause: the store may come back.
                self._drain_error = str(exc)
                self._room.set()
                await asyncio.sleep(min(1.0, self.writeback_delay * 4))
            else:
                self._drain_error = None
