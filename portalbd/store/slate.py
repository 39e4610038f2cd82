"""The one module that talks to SlateDB databases.

Everything the rest of portalbd needs from the LSM tree goes through
:class:`SlateHandle`: gets, batched writes, flushes, range scans, and the
admin calls for checkpoints and clones (:class:`SlateAdmin`). The binding
itself, its patch and its errors live in ``binding.py``; when the binding
changes, those two are the files to change. Every call is counted so ``status`` can show what the
store is being asked to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from portalbd.config import LsmConfig, default_io_threads
from portalbd.store.binding import StoreClosed as StoreClosed
from portalbd.store.binding import StoreError as StoreError
from portalbd.store.binding import StoreFenced as StoreFenced
from portalbd.store.binding import sdb, translate_error
from portalbd.store.items import Tombstone
from portalbd.store.localsync import sync_filesystem
from portalbd.store.read_bound import ReadBound

if TYPE_CHECKING:
    from portalbd.store.object_metrics import ObjectStoreCounters
    from portalbd.store.s3 import S3Settings

log = logging.getLogger("portalbd.store")

# After SlateDB gives up on the object store (retry budget spent) the
# database is closed for good ("panic"); we reopen it, at most this often.
REOPEN_INTERVAL_S = 2.0
SCAN_BATCH = 256  # entries per call into a scan iterator
# A scan over a run of blocks fetches SST blocks ahead of the iterator, four
# requests at a time: on S3 (moto) sequential 1 MiB reads ran at 12-73 MiB/s
# in four runs, 4.8 and 10.9 without (docs/s3.md). In memory it costs nothing
# (4.7 against 5.7 ms of CPU per 16-block scan). Scans of one block (random
# reads) keep SlateDB's default, which fetches only what it needs.
SCAN_READ_AHEAD_BYTES = 1 << 20
SCAN_FETCH_TASKS = 4


# A batch whose values add up to less than this is built on the loop: handing
# it to a thread (5-25 us) would cost more than the copy it saves.
INLINE_BATCH_BYTES = 16 * 1024


Value = bytes | memoryview | Tombstone | None
T = TypeVar("T")


class Encoder(Protocol):
    """How a drain turns a value into what is stored under ``key`` (envelope.encode)."""

    def __call__(self, payload: bytes | memoryview | None, /, *, key: bytes) -> bytes: ...


class _Workers:
    """The binding-call threads shared by every database of the process."""

    def __init__(self) -> None:
        self.threads = default_io_threads()
        self._pool: ThreadPoolExecutor | None = None

    def configure(self, threads: int) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.threads = max(0, threads)

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        if self._pool is None and self.threads > 0:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="portalbd-io")
        return self._pool


WORKERS = _Workers()


# How long one call into the store may take before it fails (None: forever).
# SlateDB retries some errors without end (a full disk, once a second); a
# bound turns that into an error the client sees.
OPERATION_TIMEOUT: list[float | None] = [None]
READ_TIMEOUT: list[float | None] = [None]  # gets and scans: a shorter bound
LOW_SPACE_BYTES = 8 * 1024 * 1024  # less free space than this is "full"

# A seam for the simulation (portalbd/dst/faults.py): when set, every
# database is built through it, so it can refuse the open or wrap the handle
# and inject object-store faults. The binding accepts no object store written
# in Python, so this is the lowest place faults can enter. None in the
# daemon: one lookup per open, nothing per call.
OPEN_HOOK: list[Callable[[Any, str], Awaitable[Any]] | None] = [None]


def configure_timeout(seconds: float | None, read_seconds: float | None = None) -> None:
    """Bound every store operation to ``seconds``, reads to ``read_seconds``.

    None or 0 leaves that kind unbounded.
    """
    OPERATION_TIMEOUT[0] = seconds or None
    READ_TIMEOUT[0] = read_seconds or None


def diagnose_directory(directory: Path) -> str | None:
    """Why a local store may be failing: gone, read-only, full; None if none of it."""
    try:
        stats = os.statvfs(directory)
    except FileNotFoundError:
        return f"storage directory {directory} is gone"
    except OSError as exc:
        return f"storage directory {directory}: {exc.strerror}"
    if stats.f_flag & os.ST_RDONLY:
        return f"storage {directory} is read-only"
    free = stats.f_bavail * stats.f_frsize
    if free < LOW_SPACE_BYTES:
        return f"storage full: {free} bytes free on {directory}"
    return None


def configure_io_threads(threads: int) -> None:
    """Set how many threads build write batches (0: all on the event loop)."""
    WORKERS.configure(threads)


def _build_batch(
    items: Sequence[tuple[bytes, Value]], encode: Encoder | None
) -> tuple[Any, int, int, int]:
    """A WriteBatch of ``items``: (batch, puts, deletes, bytes put).

    Runs on a worker thread: ``encode`` (compression and encryption, in C)
    and the binding's per-byte copy release the GIL, so several batches fill
    at once.
    :data:`DELETE` deletes; so does ``None`` without ``encode``.
    """
    batch = sdb.WriteBatch()
    puts = deletes = size = 0
    for key, value in items:
        if isinstance(value, Tombstone):
            stored = None
        elif encode is not None:
            stored = encode(value, key=key)
        elif value is None:
            stored = None
        else:
            stored = value if isinstance(value, bytes) else bytes(value)
        if stored is None:
            batch.delete(key)
            deletes += 1
            continue
        batch.put(key, stored)
        puts += 1
        size += len(stored)
    return batch, puts, deletes, size


@dataclass(slots=True)
class StoreCounters:
    gets: int = 0
    puts: int = 0
    deletes: int = 0
    batches: int = 0
    flushes: int = 0
    syncs: int = 0  # syncfs of a file:// store's filesystem, once per FLUSH round or snapshot
    scans: int = 0
    bytes_put: int = 0
    bytes_got: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "gets": self.gets,
            "puts": self.puts,
            "deletes": self.deletes,
            "batches": self.batches,
            "flushes": self.flushes,
            "syncs": self.syncs,
            "scans": self.scans,
            "bytes_put": self.bytes_put,
            "bytes_got": self.bytes_got,
        }


def build_settings(lsm: LsmConfig, *, max_retries: int | None = None) -> Any:
    settings = sdb.Settings.default()

    def put(key: str, value: str) -> None:
        settings.set(key, value)

    if lsm.flush_interval_ms is not None:
        put(
            "flush_interval",
            "null" if lsm.flush_interval_ms == 0 else f'"{lsm.flush_interval_ms}ms"',
        )
    if lsm.l0_sst_size_bytes is not None:
        put("l0_sst_size_bytes", str(lsm.l0_sst_size_bytes))
    # Compaction builds its output SSTs in memory: keep them no larger than
    # L0's and run one at a time, so RSS stays near the configured budget.
    sst_cap = lsm.l0_sst_size_bytes or 64 * 1024 * 1024
    put("compactor_options.worker.max_sst_size", str(max(sst_cap, 8 * 1024 * 1024)))
    put("compactor_options.max_concurrent_compactions", "1")
    # L0 fills up with one small SST per snapshot; a compactor that looks
    # for work every 5 s (the default) then stalls the next memtable flush
    # for seconds. Half a second keeps snapshot latency low at the price of
    # a few more manifest reads.
    put("compactor_options.poll_interval", '"500ms"')
    put("compactor_options.worker.compactions_poll_interval", '"500ms"')
    put("compactor_options.worker.max_concurrent_compactions", "1")
    # Each subcompaction and each L0 flush builds an SST in memory: one at a
    # time keeps that to one L0 SST plus one compaction output.
    put("compactor_options.worker.max_subcompactions", "1")
    put("l0_flush_parallelism", "1")
    if lsm.l0_max_ssts is not None:
        put("l0_max_ssts", str(lsm.l0_max_ssts))
    if lsm.max_unflushed_bytes is not None:
        put("max_unflushed_bytes", str(lsm.max_unflushed_bytes))
    if lsm.compression_codec is not None:
        codec = lsm.compression_codec.lower()
        put("compression_codec", "null" if codec == "none" else f'"{codec.capitalize()}"')
    if max_retries is not None:
        put("object_store_max_retries", str(max_retries))
    if lsm.object_cache_dir is not None:
        put("object_store_cache_options.root_folder", json.dumps(lsm.object_cache_dir))
        put("object_store_cache_options.max_cache_size_bytes", str(lsm.object_cache_bytes))
        # What this daemon writes is what it reads next: cache it on the way
        # out, L0 SSTs and the compactor's output alike. Without the latter,
        # every read after a compaction fetched the new sorted run from the
        # bucket again (docs/s3.md).
        put("object_store_cache_options.cache_on_flush", "true")
        put("object_store_cache_options.cache_on_compaction", "true")
    return settings


_SST_BLOCK_SIZES = {
    1024: "BLOCK1_KIB",
    2048: "BLOCK2_KIB",
    4096: "BLOCK4_KIB",
    8192: "BLOCK8_KIB",
    16384: "BLOCK16_KIB",
    32768: "BLOCK32_KIB",
    65536: "BLOCK64_KIB",
}


def _with_block_cache(builder: Any, lsm: LsmConfig, small: bool) -> None:
    """SlateDB's block cache on a writer's or a reader's builder (none for the catalog)."""
    if small or not lsm.block_cache_size_bytes:
        builder.with_db_cache_disabled()
        return
    options = sdb.MokaCacheOptions(
        max_capacity=lsm.block_cache_size_bytes, time_to_live=None, time_to_idle=None
    )
    builder.with_db_cache(sdb.DbCache.new_moka_cache(options), 0)


def _with_recorder(builder: Any, metrics: ObjectStoreCounters | None) -> Any:
    """A request-count recorder of ``metrics`` on ``builder``, or None without metrics."""
    if metrics is None:
        return None
    recorder = metrics.new_recorder()
    builder.with_metrics_recorder(recorder)
    return recorder


def resolve_object_store(store_url: str, s3: S3Settings | None = None) -> Any:
    if s3 is not None:
        from portalbd.store.s3 import S3SetupError, build_object_store

        try:
            return build_object_store(s3)
        except S3SetupError as exc:
            raise StoreError(str(exc)) from exc
    try:
        return sdb.ObjectStore.resolve(store_url)
    except sdb.Error as exc:
        raise translate_error(exc, f"cannot open object store {store_url}") from exc


class SlateHandle:
    """One open SlateDB database."""

    def __init__(self, db: Any, path: str, counters: StoreCounters) -> None:
        self._db = db
        self.path = path
        self.counters = counters
        self.closed = False
        # Set by open(): how to build this database again after a panic.
        self._reopen: Callable[[], Any] | None = None
        self._recorder: Any = None
        self._metrics: ObjectStoreCounters | None = None
        self._broken: str | None = None
        self._last_reopen = 0.0
        self._reopen_lock = asyncio.Lock()
        self.reopens = 0
        # Called after a reopen: what the old database acknowledged but never
        # made durable is gone, so caches above must forget it.
        self.on_reopen: Callable[[], None] | None = None
        # For file:// storage: the database's directory, to tell a full,
        # read-only or deleted disk from other failures.
        self.local_dir: Path | None = None
        self._dir_identity: tuple[int, int] | None = None
        self.health = "ok"  # or why the last operation failed
        self._read_bound: ReadBound | None = None
        # A reader (open_reader): SlateDB's DbReader, which writes nothing,
        # takes no writer epoch and so fences no one.
        self.read_only = False

    def watch_directory(self, directory: Path) -> None:
        """Remember the database directory, so its removal is noticed."""
        self.local_dir = directory
        try:
            st = os.stat(directory)
        except OSError:
            return
        self._dir_identity = (st.st_dev, st.st_ino)

    def _directory_gone(self) -> str | None:
        if self.local_dir is None or self._dir_identity is None:
            return None
        try:
            st = os.stat(self.local_dir)
        except OSError:
            return f"storage directory {self.local_dir} was removed"
        if (st.st_dev, st.st_ino) != self._dir_identity:
            return f"storage directory {self.local_dir} was removed and made again"
        return None

    def _set_health(self, health: str) -> None:
        if health == self.health:
            return
        if health == "ok":
            log.warning("storage %s answers again (was: %s)", self.path, self.health)
        else:
            log.error("storage %s failing: %s", self.path, health)
        self.health = health

    def _error(self, error: StoreError) -> StoreError:
        """Record why storage failed (diagnosed where it is local), and return it."""
        reason = None
        if self.local_dir is not None:
            reason = self._directory_gone() or diagnose_directory(self.local_dir)
        self._set_health(reason or str(error))
        if reason and reason not in str(error):
            return type(error)(f"{error} ({reason})")
        return error

    async def _bounded(self, awaitable: Awaitable[T], what: str, *, read: bool = False) -> T:
        """Await a binding call within the operation (or read) timeout.

        A read's timeout counts from the last answer the store gave any
        read (read_bound.py), so a long queue on a slow store is waited
        out and only a silent store fails reads.
        """
        timeout = READ_TIMEOUT[0] if read else OPERATION_TIMEOUT[0]
        if timeout is None:
            return await awaitable
        try:
            if read:
                if self._read_bound is None or self._read_bound.timeout != timeout:
                    cap = max(timeout, OPERATION_TIMEOUT[0] or 0)
                    self._read_bound = ReadBound(timeout, cap)
                return await self._read_bound.run(awaitable)
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError:
            bound = self._read_bound
            if read and bound is not None and not bound.silent():
                message = (
                    f"{what}: storage kept answering other reads, but not this one "
                    f"within {bound.cap:g} s"
                )
            else:
                message = f"{what}: storage did not answer within {timeout:g} s"
            raise self._error(StoreError(message)) from None

    @classmethod
    async def open(
        cls,
        object_store: Any,
        path: str,
        lsm: LsmConfig,
        counters: StoreCounters | None = None,
        *,
        max_retries: int | None = None,
        small: bool = False,
        metrics: ObjectStoreCounters | None = None,
    ) -> SlateHandle:
        """Open (or create) the database at ``path`` inside ``object_store``.

        ``small`` is for the catalog: a tiny database that must not reserve
        a block cache of its own.
        """
        builder = sdb.DbBuilder(path, object_store)
        builder.with_settings(build_settings(lsm, max_retries=max_retries))
        _with_block_cache(builder, lsm, small)
        if lsm.filter_bits_per_key and not small:
            builder.with_filter_policies([sdb.FilterPolicy.bloom(lsm.filter_bits_per_key)])
        sst_block = lsm.sst_block_bytes()
        if sst_block and not small:
            builder.with_sst_block_size(getattr(sdb.SstBlockSize, _SST_BLOCK_SIZES[sst_block]))
        recorder = _with_recorder(builder, metrics)
        hook = OPEN_HOOK[0]
        try:
            db = await (builder.build() if hook is None else hook(builder, path))
        except sdb.Error as exc:
            if metrics is not None:
                metrics.retire(recorder)
            raise translate_error(exc, f"cannot open database {path!r}") from exc
        handle = cls(db, path, counters or StoreCounters())
        handle._recorder, handle._metrics = recorder, metrics

        async def reopen() -> Any:
            again = await cls.open(
                object_store, path, lsm, max_retries=max_retries, small=small, metrics=metrics
            )
            return again

        handle._reopen = reopen
        return handle

    @classmethod
    async def open_reader(
        cls,
        object_store: Any,
        path: str,
        lsm: LsmConfig,
        *,
        checkpoint: str | None = None,
        poll_interval_ms: int = 500,
        small: bool = False,
        metrics: ObjectStoreCounters | None = None,
    ) -> SlateHandle:
        """Open ``path`` for reading only: its latest state, followed, or one checkpoint.

        Following polls the manifest and replays the WAL, so what the writer
        has flushed is seen within about ``poll_interval_ms``. A checkpoint
        (a snapshot) never changes. Neither mode writes to the store: the
        managed-checkpoint mode, which would, is not used.
        """
        builder = sdb.DbReaderBuilder(path, object_store)
        if checkpoint is None:
            builder.with_reader_mode(sdb.ReaderMode.FOLLOW_LATEST())
        else:
            builder.with_reader_mode(sdb.ReaderMode.CHECKPOINT(checkpoint))
        builder.with_options(
            sdb.ReaderOptions(
                manifest_poll_interval_ms=poll_interval_ms,
                checkpoint_lifetime_ms=60_000,
                max_memtable_bytes=lsm.max_unflushed_bytes or 64 * 1024 * 1024,
                skip_wal_replay=False,
            )
        )
        _with_block_cache(builder, lsm, small)
        recorder = _with_recorder(builder, metrics)
        try:
            reader = await builder.build()
        except sdb.Error as exc:
            if metrics is not None:
                metrics.retire(recorder)
            raise translate_error(exc, f"cannot open database {path!r} for reading") from exc
        handle = cls(reader, path, StoreCounters())
        handle._recorder, handle._metrics = recorder, metrics
        handle.read_only = True

        async def reopen() -> Any:
            return await cls.open_reader(
                object_store,
                path,
                lsm,
                checkpoint=checkpoint,
                poll_interval_ms=poll_interval_ms,
                small=small,
                metrics=metrics,
            )

        handle._reopen = reopen
        return handle

    def durable_seq(self) -> int | None:
        """The newest sequence number this database has seen durable (None: unknown)."""
        try:
            return int(self._db.status().durable_seq)
        except Exception:  # the handle may already be gone
            return None

    def _failed(self, exc: BaseException, what: str) -> StoreError:
        """Translate an error; notice when SlateDB has given up on the store."""
        error = self._error(translate_error(exc, what))
        if not isinstance(error, StoreFenced) and self.status_closed_reason() == "panic":
            self._broken = str(error)
        return error

    async def _recover(self) -> None:
        """Reopen a database SlateDB closed after an object-store outage.

        Reopening replays the WAL from the bucket; writes the dead instance
        acknowledged but never uploaded are lost, which is why FLUSH failed.
        Attempts are spaced so an outage costs one timeout per interval, and
        every caller in between gets an immediate error instead of a hang.
        """
        async with self._reopen_lock:
            if self._broken is None or self.closed:
                return
            if self._reopen is None:
                raise StoreError(f"storage failed: {self._broken}")
            wait = self._last_reopen + REOPEN_INTERVAL_S - time.monotonic()
            if wait > 0:
                raise StoreError(f"storage unavailable, reconnecting: {self._broken}")
            self._last_reopen = time.monotonic()
            try:
                fresh: SlateHandle = await self._bounded(self._reopen(), "reopening")
            except StoreError as exc:
                # The interval counts from the end of a failed attempt: one
                # that took longer than the interval must not let the very
                # next caller (a disconnect's flush) start another at once.
                self._last_reopen = time.monotonic()
                raise StoreError(f"storage unavailable, reconnect failed: {exc}") from exc
            old_db, old_recorder = self._db, self._recorder
            self._db, self._recorder = fresh._db, fresh._recorder
            self._broken = None
            self.reopens += 1
            log.warning("reopened database %s after an object-store failure", self.path)
            with contextlib.suppress(Exception):
                await self._bounded(old_db.shutdown(), "closing the failed database")
            if self._metrics is not None and old_recorder is not None:
                self._metrics.retire(old_recorder)
            if self.on_reopen is not None:
                self.on_reopen()

    async def get(self, key: bytes) -> bytes | None:
        self.counters.gets += 1
        if self._broken is not None:
            await self._recover()
        try:
            value: bytes | None = await self._bounded(self._db.get(key), "read failed", read=True)
        except sdb.Error as exc:
            raise self._failed(exc, "read failed") from exc
        if value is not None:
            self.counters.bytes_got += len(value)
        return value

    @property
    def parallelism(self) -> int:
        """How many write batches are worth keeping in flight at once."""
        return WORKERS.threads + 1

    async def write(
        self, items: Sequence[tuple[bytes, Value]], *, encode: Encoder | None = None
    ) -> None:
        """Apply puts and deletes atomically, as one batch.

        With ``encode`` every value (``None`` included) is encoded and put;
        without it ``None`` deletes the key. :data:`DELETE` always deletes.
        """
        if not items:
            return
        if self.read_only:
            raise StoreError(f"write refused: {self.path!r} is open read-only (a replica)")
        pool = WORKERS.pool
        payload = sum(len(v) for _, v in items if isinstance(v, bytes | memoryview))
        if pool is None or payload < INLINE_BATCH_BYTES:
            batch, puts, deletes, size = _build_batch(items, encode)
        else:
            loop = asyncio.get_running_loop()
            batch, puts, deletes, size = await loop.run_in_executor(
                pool, _build_batch, items, encode
            )
        counters = self.counters
        counters.puts += puts
        counters.deletes += deletes
        counters.bytes_put += size
        counters.batches += 1
        if self._broken is not None:
            await self._recover()
        try:
            await self._bounded(self._db.write(batch), "write failed")
        except sdb.Error as exc:
            raise self._failed(exc, "write failed") from exc

    async def flush(self, *, memtable: bool = False) -> None:
        """Make every write so far durable in the object store.

        The WAL flush is what NBD FLUSH needs; a memtable flush is what a
        checkpoint needs, because checkpoints only see SSTs and the WAL.
        """
        self.counters.flushes += 1
        if self.read_only:
            return  # nothing was written here, so nothing can be lost
        if self._broken is not None:
            await self._recover()
        gone = self._directory_gone()
        if gone is not None:
            # SlateDB would write into a new, empty directory and report
            # success; nothing written before could ever be read again.
            raise self._error(StoreError(f"flush failed: {gone}; the data on it is lost"))
        try:
            if memtable:
                await self._bounded(
                    self._db.flush_with_options(
                        sdb.FlushOptions(flush_type=sdb.FlushType.MEM_TABLE)
                    ),
                    "flush failed",
                )
            else:
                await self._bounded(self._db.flush(), "flush failed")
        except sdb.Error as exc:
            raise self._failed(exc, "flush failed") from exc
        if memtable:
            await self.sync()  # a snapshot's tables, on disk before it is listed
        self._set_health("ok")

    async def sync(self) -> None:
        """file:// storage: what SlateDB wrote so far reaches the disk (localsync.py).

        A WAL flush survives the daemon; only this survives a power cut. It
        is what an NBD FLUSH needs, not every background drain: data no
        FLUSH covered may be lost in a power cut anyway.
        """
        if self.local_dir is None or self.read_only:
            return
        self.counters.syncs += 1
        try:
            await self._bounded(asyncio.to_thread(sync_filesystem, self.local_dir), "flush failed")
        except OSError as exc:
            raise self._error(
                StoreError(f"flush failed: syncing {self.local_dir} to disk: {exc.strerror}")
            ) from exc

    async def scan(
        self, start: bytes, end: bytes, limit: int = 1 << 30, *, sequential: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Keys in [start, end) with their values, in order.

        One iterator hands back many entries per call into the binding, so
        reading a run of blocks this way costs far less than a get each.
        ``sequential`` (a run of blocks) fetches ahead of the iterator.
        """
        self.counters.scans += 1
        if self._broken is not None:
            await self._recover()
        rng = sdb.KeyRange(start=start, start_inclusive=True, end=end, end_inclusive=False)
        db = self._db

        async def entries() -> list[tuple[bytes, bytes]]:
            found: list[tuple[bytes, bytes]] = []
            if sequential:
                options = sdb.ScanOptions(
                    durability_filter=sdb.DurabilityLevel.MEMORY,
                    dirty=False,
                    read_ahead_bytes=SCAN_READ_AHEAD_BYTES,
                    cache_blocks=True,
                    max_fetch_tasks=SCAN_FETCH_TASKS,
                )
                iterator = await db.scan_with_options(rng, options)
            else:
                iterator = await db.scan(rng)
            while len(found) < limit:
                wanted = min(SCAN_BATCH, limit - len(found))
                batch = await iterator.next_batch(wanted)
                found.extend((kv.key, kv.value) for kv in batch)
                if len(batch) < wanted:
                    break  # a short batch means the iterator is exhausted
            return found

        try:
            out: list[tuple[bytes, bytes]] = await self._bounded(
                entries(), "scan failed", read=True
            )
        except sdb.Error as exc:
            raise self._failed(exc, "scan failed") from exc
        self.counters.bytes_got += sum(len(v) for _, v in out)
        return out

    def status_closed_reason(self) -> str | None:
        try:
            reason = self._db.status().close_reason
        except Exception:  # the handle may already be gone
            return None
        return None if reason is None else str(reason.name).lower()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._bounded(self._db.shutdown(), "close failed")
        except sdb.Error as exc:
            raise translate_error(exc, "close failed") from exc
        finally:
            if self._metrics is not None and self._recorder is not None:
                self._metrics.retire(self._recorder)
                self._recorder = None


class SlateAdmin:
    """Checkpoints and clones of one database path."""

    def __init__(self, object_store: Any, path: str) -> None:
        builder = sdb.AdminBuilder(path, object_store)
        self._admin = builder.build()
        self._object_store = object_store
        self.path = path

    async def create_checkpoint(self, name: str) -> str:
        try:
            result = await self._admin.create_detached_checkpoint(
                sdb.CheckpointOptions(lifetime_ms=None, source=None, name=name)
            )
        except sdb.Error as exc:
            raise translate_error(exc, f"checkpoint {name!r} failed") from exc
        return str(result.id)

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        try:
            await self._admin.delete_checkpoint(checkpoint_id)
        except sdb.Error as exc:
            raise translate_error(exc, f"deleting checkpoint {checkpoint_id} failed") from exc

    async def find_checkpoint(self, name: str) -> str | None:
        """The id of the named checkpoint, read from the manifest only.

        Listing through the admin API does not open the database, so it is
        safe while a daemon serves it (opening would fence that daemon).
        """
        try:
            checkpoints = await self._admin.list_checkpoints(name)
        except sdb.Error as exc:
            raise translate_error(exc, f"listing checkpoints of {self.path!r} failed") from exc
        for checkpoint in checkpoints:
            if checkpoint.name == name:
                return str(checkpoint.id)
        return None

    async def list_checkpoints(self) -> list[str]:
        try:
            checkpoints = await self._admin.list_checkpoints(None)
        except sdb.Error as exc:
            raise translate_error(exc, "listing checkpoints failed") from exc
        return [str(c.id) for c in checkpoints]

    async def clone_to(self, target_path: str, checkpoint_id: str) -> None:
        """Create ``target_path`` as a copy-on-write clone of a checkpoint."""
        try:
            builder = sdb.AdminBuilder(target_path, self._object_store).build()
            clone = builder.create_clone_builder_from_source(
                sdb.CloneSourceSpec(path=self.path, checkpoint=checkpoint_id, projection_range=None)
            )
            await clone.build()
        except sdb.Error as exc:
            raise translate_error(exc, f"cloning checkpoint {checkpoint_id} failed") from exc

    async def delete_database(self) -> None:
        try:
            await self._admin.delete_db(True)
        except sdb.Error as exc:
            raise translate_error(exc, f"deleting database {self.path!r} failed") from exc


async def gather_gets(handle: SlateHandle, keys: Sequence[bytes]) -> list[bytes | None]:
    """Issue several gets at once: the binding overlaps them well."""
    return list(await asyncio.gather(*(handle.get(k) for k in keys)))
