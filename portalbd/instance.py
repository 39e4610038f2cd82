"""A running instance: storage, device, NBD server, and what operators ask of it.

This is where the pieces meet: opening the storage and checking the device
metadata, the actions operators ask for (snapshots, restore, traces), and
shutting down in the right order. Which request runs which action is in
``control/dispatch.py``; what ``status`` reports is in ``status.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from pathlib import Path
from typing import Any

from portalbd.allocation import Tracker
from portalbd.config import Config, LsmConfig
from portalbd.control import protocol as cp
from portalbd.control.dispatch import dispatch
from portalbd.control.requests import AnyRequest
from portalbd.device import Device, DeviceError
from portalbd.faults import crash_point
from portalbd.nbd.handshake import TlsMode
from portalbd.nbd.server import NbdLimits, NbdServer, PauseTimeout, RequestObserver
from portalbd.nbd.tls import tls_mode
from portalbd.paths import object_cache_root
from portalbd.private import check_secret_file
from portalbd.retention import RetentionPolicy
from portalbd.snapshot_schedule import Schedule, SnapshotScheduler
from portalbd.stats import ServerStats
from portalbd.status import status_document
from portalbd.store.instance import InstanceStore, SnapshotRecord
from portalbd.store.keyfile import KeyFileError, read_key_file
from portalbd.store.location import EPHEMERAL_WARNING, StorageLocation, parse_storage_url
from portalbd.store.metadata import (
    DeviceMetadata,
    MetadataError,
    open_metadata,
    read_metadata,
    unlock,
    write_metadata,
)
from portalbd.store.original import OriginalLayoutError
from portalbd.store.replica import REFUSED, ReplicaStore
from portalbd.store.s3 import S3Settings, S3SetupError, preflight, resolve_settings
from portalbd.store.sealing import Sealer
from portalbd.store.slate import (
    SlateHandle,
    StoreError,
    configure_io_threads,
    configure_timeout,
)
from portalbd.store.usage import UsageSampler

log = logging.getLogger("portalbd")


def memory_budgets(cfg: Config) -> dict[str, int]:
    """The bounded parts of the daemon's memory, in bytes, as logged at start.

    One function so the NixOS module's MemoryMax (tests/system/test_nix.py)
    and the log line add up the same things.
    """
    lsm = cfg.lsm
    return {
        "cache": cfg.device.cache_bytes,
        "dirty": cfg.device.dirty_bytes,
        "slatedb_unflushed": lsm.max_unflushed_bytes or 0,
        "slatedb_block_cache": lsm.block_cache_size_bytes or 0,
        "nbd_payloads": NbdLimits().budget,
    }


class StartupError(Exception):
    """The instance cannot start; the message tells the operator why."""


class Instance:
    def __init__(
        self,
        config: Config,
        control_socket: Path,
        tls_context: ssl.SSLContext | None = None,
        *,
        encryption_key: bytes | None = None,
    ) -> None:
        """``encryption_key`` beats ``[storage] encryption_key_file``: for the
        simulation, which runs without files."""
        self.config = config
        self.tls_context = tls_context  # from [nbd.tls] (nbd/tls.py), None with TLS off
        self._encryption_key = encryption_key
        self.sealer: Sealer | None = None
        self.name = config.instance.name
        self.control_socket = control_socket
        self.location: StorageLocation = parse_storage_url(config.storage.url)
        self.stats = ServerStats()
        self.started_at = time.monotonic()
        self.store: InstanceStore | None = None
        self.replica: ReplicaStore | None = None  # --read-only: the same store, as a replica
        self.device: Device | None = None
        self.server: NbdServer | None = None
        self.nbd_address = ""
        self.recorder: Any = None
        self.usage: UsageSampler | None = None
        # which blocks hold data (status: allocated_bytes); not on a read replica
        self.allocation = Tracker()
        self._admin_lock = asyncio.Lock()
        # what the last restore did, for status (its reply stays the original's "Ok")
        self.last_restore: dict[str, Any] | None = None
        self.restoring = False  # a restore holds the admin lock: scheduled snapshots wait
        self.scheduler: SnapshotScheduler | None = None  # [snapshots] every = ...
        self.s3: S3Settings | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # --- start and stop -------------------------------------------------------

    async def check_s3(self) -> None:
        """Resolve S3 settings and check the bucket before SlateDB touches it."""
        try:
            self.s3 = resolve_settings(self.location, self.config.storage.s3)
            log.info(
                "S3 storage %s",
                " ".join(f"{k}={v}" for k, v in self.s3.describe().items()),
            )
            await asyncio.to_thread(preflight, self.s3, read_only=self.config.device.read_only)
        except S3SetupError as exc:
            raise StartupError(f"cannot use storage {self.location.display}: {exc}") from exc

    def _lsm_with_object_cache(self) -> LsmConfig:
        """S3 disks cache the objects they read on local disk unless told not to."""
        lsm = self.config.lsm
        if self.location.kind != "s3" or lsm.object_cache_dir is not None:
            return lsm  # (object_cache_bytes = 0 turns it off in store/instance.py)
        root = object_cache_root(self.name)
        return dataclasses.replace(lsm, object_cache_dir=str(root))

    async def _key(self) -> bytes | None:
        """The encryption key, read before storage is touched so a bad file costs nothing."""
        path = self.config.storage.encryption_key_file
        if self._encryption_key is not None or path is None:
            return self._encryption_key
        await asyncio.to_thread(check_secret_file, Path(path), "encryption key file")
        try:
            return await asyncio.to_thread(read_key_file, Path(path))
        except KeyFileError as exc:
            raise StartupError(f"encryption key file {path}: {exc}") from exc

    async def open(self) -> None:
        cfg = self.config
        key = await self._key()
        configure_io_threads(cfg.device.io_threads)
        configure_timeout(cfg.storage.timeout_ms / 1000, cfg.storage.read_timeout_ms / 1000)
        if self.location.kind == "s3":
            await self.check_s3()
        if cfg.device.read_only:
            meta = await self._open_replica(key)
        else:
            meta = await self._open_writer(key)
        if self.location.ephemeral:
            log.warning("%s", EPHEMERAL_WARNING)
        size = meta.size_bytes
        log.info(
            "device format=%d block_size=%d page_size=%d epoch=%d io_threads=%d encrypted=%s",
            meta.layout.version,
            meta.block_size,
            meta.layout.page_size,
            meta.layout.epoch,
            cfg.device.io_threads,
            "no" if meta.encryption is None else meta.encryption.cipher,
        )
        budgets = memory_budgets(cfg)
        log.info(
            "memory budgets %s total=%dMiB (RSS may run up to 100 MiB above: "
            "interpreter, SlateDB's SST builds, allocator; benchmarks/memory.py)",
            " ".join(f"{k}={v >> 20}MiB" for k, v in budgets.items()),
            sum(budgets.values()) >> 20,
        )
        assert self.store is not None
        # Following a writer, what was read may change under us: no clean
        # cache, no memory of which blocks have no deltas (device.py).
        follows = self.replica is not None and self.replica.state.mode == "follow"
        self.device = Device(
            self.store.data,
            size=size,
            block_size=meta.block_size,
            cache_bytes=0 if follows else cfg.device.cache_bytes,
            dirty_bytes=cfg.device.dirty_bytes,
            on_flush=self.stats.flush_latency.record,
            layout=meta.layout,
            sealer=self.sealer,
            follows_store=follows,
        )
        self.device.start()
        if self.replica is None:  # a replica's store changes under it without drains
            self.allocation.start(self.device)
        self.usage = UsageSampler(self.location, self.s3)
        self.usage.start()
        self.store.data.on_reopen = self.device.forget_clean_cache
        if self.replica is None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch_fencing(), name="portalbd-fencing-watchdog"
            )
        else:  # a replica polls the catalog (snapshots, a restore on the writer)
            self._watchdog = asyncio.get_running_loop().create_task(
                self._follow(self.replica), name="portalbd-replica-follower"
            )
        self.server = NbdServer(
            self.device,
            export_name=cfg.nbd.export_name,
            description=f"portalbd {self.name}",
            stats=self.stats,
            max_connections=cfg.nbd.max_connections,
            read_only=cfg.device.read_only,
            tls_context=self.tls_context,
            tls_mode=TlsMode.OFF if self.tls_context is None else tls_mode(cfg.nbd.tls),
        )
        if cfg.record.path:
            self.start_trace(Path(cfg.record.path), cfg.record.workload)
        self.start_schedule()

    def start_schedule(self) -> None:
        """``[snapshots] every``: snapshot on a schedule and prune (snapshot_schedule.py)."""
        snapshots = self.config.snapshots
        every_s = snapshots.every_seconds()
        if every_s is None or snapshots.every is None or self.replica is not None:
            return
        policy = RetentionPolicy(
            keep=snapshots.keep or 1,
            keep_daily=snapshots.keep_daily or 0,
            keep_weekly=snapshots.keep_weekly or 0,
        )
        self.scheduler = SnapshotScheduler(self, Schedule(snapshots.every, every_s, policy))
        self.scheduler.start()
        log.info(
            "snapshot schedule every=%s keep=%d keep_daily=%d keep_weekly=%d",
            snapshots.every,
            policy.keep,
            policy.keep_daily,
            policy.keep_weekly,
        )

    async def _open_writer(self, key: bytes | None) -> DeviceMetadata:
        """Open the storage as its one writer (fencing any older one) and its metadata."""
        cfg = self.config
        try:
            self.store = await InstanceStore.open(
                self.location,
                self._lsm_with_object_cache(),
                max_retries=cfg.storage.s3.max_retries if self.location.kind == "s3" else None,
                s3=self.s3,
            )
        except OriginalLayoutError as exc:
            raise StartupError(str(exc)) from exc
        except StoreError as exc:
            raise StartupError(f"cannot open storage {self.location.display}: {exc}") from exc
        if self.store.object_cache_dir is not None:
            log.info(
                "object cache dir=%s max_bytes=%d",
                self.store.object_cache_dir,
                cfg.lsm.object_cache_bytes,
            )
        # A restore cut short by a crash leaves a cloned generation nothing
        # refers to; collect it now rather than at the next restore or delete.
        try:
            removed = await self.store.collect_garbage()
        except StoreError as exc:
            log.warning("garbage collection at start failed: %s", exc)
        else:
            if removed:
                log.info("removed unreferenced generations %s", removed)
        try:
            meta, self.sealer = await open_metadata(
                self.store.data,
                cfg.device.requested_size(),
                cfg.device.block_size,
                cfg.device.effective_size(),
                key,
            )
        except MetadataError as exc:
            raise StartupError(str(exc)) from exc
        return meta

    async def _open_replica(self, key: bytes | None) -> DeviceMetadata:
        """Open another daemon's disk for reading only (store/replica.py): no write, ever."""
        cfg = self.config
        try:
            store = await ReplicaStore.open_replica(
                self.location, cfg.lsm, snapshot=cfg.device.snapshot, s3=self.s3
            )
        except OriginalLayoutError as exc:
            raise StartupError(str(exc)) from exc
        except StoreError as exc:
            raise StartupError(
                f"cannot open storage {self.location.display} read-only: {exc}"
            ) from exc
        self.store = self.replica = store
        try:
            meta = await read_metadata(store.data)
        except (MetadataError, StoreError) as exc:
            raise StartupError(f"cannot read the device metadata: {exc}") from exc
        if meta is None:
            raise StartupError(
                f"generation {store.generation} at {self.location.display} has no device "
                "metadata yet (the writer has not flushed it); nothing to serve"
            )
        try:
            self.sealer = unlock(meta, key)
        except MetadataError as exc:
            raise StartupError(str(exc)) from exc
        requested = cfg.device.requested_size()
        if requested is not None and requested != meta.size_bytes:
            log.warning(
                "read-only: serving the recorded size %d, not the %d bytes asked for",
                meta.size_bytes,
                requested,
            )
        what = f"snapshot {cfg.device.snapshot}" if cfg.device.snapshot else "the live disk"
        log.info(
            "read-only replica of %s at %s generation=%d (writes nothing, fences no one)",
            what,
            self.location.display,
            store.generation,
        )
        return meta

    async def _follow(self, store: ReplicaStore) -> None:
        """Poll the writer's catalog; following, swap to a new live generation after a restore."""
        assert self.device is not None
        while True:
            await asyncio.sleep(store.state.poll_interval_ms / 1000)
            try:
                fresh = await store.poll()
            except StoreError as exc:  # the new generation did not open: next poll retries
                store.state.last_error = str(exc)
                log.warning("read-only: cannot follow the writer yet: %s", exc)
                continue
            if fresh is None:
                continue
            for _ in range(100):
                try:
                    self.device.swap_store(fresh)
                    break
                except DeviceError:
                    await asyncio.sleep(0.01)  # reads in flight on the old generation
            else:
                await fresh.close()  # still busy: next poll tries again
                continue
            old = await store.retire(fresh)
            fresh.on_reopen = self.device.forget_clean_cache
            log.info("read-only: the writer's live generation is now %d", store.generation)
            with contextlib.suppress(StoreError):
                await old.close()

    async def listen(self) -> None:
        assert self.server is not None
        cfg = self.config
        # The Unix listener first: once the TCP port answers, both are ready.
        if cfg.nbd.socket:
            try:
                await self.server.listen_unix(Path(cfg.nbd.socket))
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for NBD on socket {cfg.nbd.socket}: {exc.strerror}"
                ) from exc
            log.info("NBD listening socket=%s", cfg.nbd.socket)
        if cfg.nbd.address:
            from portalbd.config import parse_address

            host, port = parse_address(cfg.nbd.address)
            try:
                bound_host, bound_port = await self.server.listen_tcp(host, port)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for NBD on {cfg.nbd.address}: {exc.strerror}"
                ) from exc
            self.nbd_address = f"{bound_host}:{bound_port}"
            log.info(
                "NBD listening address=%s export=%s tls=%s",
                self.nbd_address,
                cfg.nbd.export_name,
                self.server.tls_mode.value,
            )

    async def _watch_fencing(self, interval: float = 1.0) -> None:
        """Stop serving as soon as a newer daemon takes this storage over.

        SlateDB notices the newer writer when it next writes or polls the
        manifest; either way its status says "fenced" and we stop, rather
        than answer clients from a disk someone else now owns.
        """
        while not self.fatal.done():
            await asyncio.sleep(interval)
            if self.store is not None and self.store.fenced():
                message = (
                    f"another portalbd opened storage {self.location.display} and fenced "
                    "this daemon out; it no longer owns the disk"
                )
                log.error("%s", message)
                if not self.fatal.done():
                    self.fatal.set_result(message)
                return

    async def close(self) -> str:
        """Stop serving, flush everything, close storage; return a summary."""
        result = "ok"
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.usage is not None:
            await self.usage.stop()
        await self.allocation.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.server is not None:
            await self.server.close_listeners()
            await self.server.disconnect_all("daemon shutting down")
        if self.device is not None:
            try:
                await self.device.stop()
            except DeviceError as exc:
                result = f"final flush failed: {exc}"
                log.error("final flush failed: %s", exc)
        self.stop_trace()
        if self.store is not None:
            try:
                await self.store.close()
            except StoreError as exc:
                log.error("closing storage failed: %s", exc)
                if result == "ok":
                    result = f"close failed: {exc}"
        return result

    # --- traces ---------------------------------------------------------------

    def start_trace(self, path: Path, workload: str) -> None:
        """Record to the operator's own path (``--trace``, ``[record] path``).

        That path is the operator's choice, so it may be anywhere and an
        existing file is replaced; only a symlink there is refused.
        """
        from portalbd.trace.recorder import TraceRecorder

        assert self.device is not None
        self._begin_trace(TraceRecorder.open(path, workload, self.device.size), workload)

    def start_control_trace(self, requested: str, workload: str) -> None:
        """TraceStart: a control client may only create new files in the trace directory.

        Anyone in the socket's group can send this, so it must not let them
        make the daemon's user truncate or write files elsewhere.
        """
        from portalbd.trace.recorder import TracePathError, TraceRecorder, trace_dir_for

        assert self.device is not None
        trace_dir = trace_dir_for(self.control_socket)
        try:
            recorder = TraceRecorder.create_in(trace_dir, requested, workload, self.device.size)
        except TracePathError as exc:
            log.warning("refused TraceStart path=%r: %s", requested, exc)
            raise cp.BadRequest(f"TraceStart: {exc}") from None
        except OSError as exc:
            raise cp.BadRequest(
                f"TraceStart: cannot create trace {requested!r} in {str(trace_dir)!r}: "
                f"{exc.strerror}"
            ) from None
        self._begin_trace(recorder, workload)

    def _begin_trace(self, recorder: Any, workload: str) -> None:
        """Swap in an opened recorder; the old one stops only now, so a refusal keeps it."""
        assert self.server is not None
        self.stop_trace()
        self.recorder = recorder
        observer: RequestObserver = recorder
        self.server.observers.append(observer)
        log.info("recording trace path=%s workload=%s", recorder.path, workload)

    def stop_trace(self) -> bool:
        recorder = self.recorder
        if recorder is None:
            return False
        if self.server is not None and recorder in self.server.observers:
            self.server.observers.remove(recorder)
        recorder.close()
        self.recorder = None
        log.info("trace recording stopped")
        return True

    # --- control requests -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return status_document(self)

    async def handle(self, request: AnyRequest) -> Any:
        """The control server's handler (control/dispatch.py answers)."""
        return await dispatch(self, request)

    def _refuse_on_replica(self, what: str) -> None:
        if self.replica is not None:
            raise cp.BadRequest(REFUSED.format(what=what))

    async def create_snapshot(self, name: str) -> dict[str, Any]:
        assert self.store is not None and self.device is not None
        self._refuse_on_replica("taking a snapshot")
        async with self._admin_lock:
            if self.store.catalog.find(name) is not None:
                raise cp.BadRequest(f"snapshot {name!r} already exists")
            started = time.monotonic()
            # Everything acknowledged before this request goes into the snapshot.
            await self.device.flush()
            try:
                record = await self.store.create_snapshot(name, self.stats.bytes_written)
            except StoreError as exc:
                raise cp.BadRequest(str(exc)) from exc
            log.info(
                "snapshot created name=%s id=%s generation=%d in %.1f ms",
                name,
                record.id,
                record.generation,
                (time.monotonic() - started) * 1000,
            )
            return record.public()

    async def delete_snapshot(self, name: str) -> None:
        assert self.store is not None
        self._refuse_on_replica("deleting a snapshot")
        async with self._admin_lock:
            try:
                await self.store.delete_snapshot(name)
            except StoreError as exc:
                raise cp.BadRequest(str(exc)) from exc
            log.info("snapshot deleted name=%s", name)

    # --- what the snapshot scheduler asks (snapshot_schedule.ScheduleTarget) ----

    def snapshot_records(self) -> list[SnapshotRecord]:
        assert self.store is not None
        return list(self.store.catalog.snapshots)

    def protected_snapshots(self) -> set[str]:
        """Never pruned: the snapshot the disk was last restored from (this run)."""
        return set() if self.last_restore is None else {str(self.last_restore["name"])}

    async def prune_snapshot(self, name: str) -> bool:
        """Delete a scheduled snapshot, unless by the time the lock is ours it is
        protected or gone (a restore may have run meanwhile); True if deleted."""
        assert self.store is not None
        async with self._admin_lock:
            if name in self.protected_snapshots() or self.store.catalog.find(name) is None:
                return False
            await self.store.delete_snapshot(name)
        return True

    async def _carry_metadata(self, handle: SlateHandle) -> None:
        assert self.device is not None
        restored = await read_metadata(handle)
        size = self.device.size if restored is None else max(restored.size_bytes, self.device.size)
        layout = self.device.layout
        if restored is not None and restored.layout.version != layout.version:
            layout = restored.layout  # never rewrite a snapshot's format
        sealer = self.sealer
        encryption = None
        if sealer is not None:
            # A snapshot is of this disk: same id, same key. Anything else
            # in its metadata is refused rather than served with our key.
            if restored is None or restored.encryption is None:
                raise StoreError("the snapshot's metadata does not record this disk's encryption")
            if restored.encryption.disk_id != sealer.disk_id:
                raise StoreError("the snapshot belongs to another encrypted disk")
            encryption = restored.encryption
        elif restored is not None and restored.encryption is not None:
            raise StoreError("the snapshot is of an encrypted disk; this one is not")
        await write_metadata(
            handle, DeviceMetadata(size, self.device.block_size, layout, encryption), sealer
        )

    async def restore(self, name: str, *, force: bool) -> None:
        """Make the disk what it was at the snapshot; keep every snapshot.

        Attached clients stay attached with their I/O paused for the swap,
        as the original's write lock does; ``force`` disconnects them first
        instead, for filesystems that should notice.
        """
        assert self.store is not None and self.device is not None and self.server is not None
        self._refuse_on_replica("a restore")
        async with self._admin_lock:
            if self.store.catalog.find(name) is None:
                raise cp.BadRequest(f"snapshot {name!r} not found")
            started = time.monotonic()
            self.server.refusal = "a snapshot restore is in progress"
            disconnected = paused = 0
            paused_at: float | None = None
            self.restoring = True
            try:
                if force:
                    disconnected = await self.server.disconnect_all(f"restoring snapshot {name}")
                else:
                    paused_at = time.monotonic()
                    timeout = self.config.storage.timeout_ms / 1000 or None
                    try:
                        paused = await self.server.pause_io(timeout)
                    except PauseTimeout as exc:
                        raise cp.BadRequest(
                            f"restore failed, disk unchanged: could not pause I/O: {exc}"
                        ) from exc
                generation, old = await self._swap_to(name)
                self.allocation.start(self.device)  # another disk: count it afresh
            finally:
                self.server.refusal = None
                self.server.resume_io()
                self.restoring = False
            pause_ms = 0.0 if paused_at is None else (time.monotonic() - paused_at) * 1000
            removed = await self._retire(old)
            self.last_restore = {
                "name": name,
                "generation": generation,
                "disconnected": disconnected,
                "paused": paused,
                "paused_ms": round(pause_ms, 1),
                "removed_generations": removed,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "finished_at": round(time.time(), 3),
            }
            if paused:
                log.info(
                    "restore paused I/O of %d client%s for %.1f ms",
                    paused,
                    "" if paused == 1 else "s",
                    pause_ms,
                )
            log.info(
                "snapshot restored name=%s generation=%d disconnected=%d paused=%d removed=%s "
                "in %.1f ms",
                name,
                generation,
                disconnected,
                paused,
                removed,
                (time.monotonic() - started) * 1000,
            )

    async def _swap_to(self, name: str) -> tuple[int, SlateHandle]:
        """Flush, make the snapshot's clone the live generation, serve from it.

        No request may run meanwhile (the caller paused or disconnected
        them). Returns the new generation and the previous one's handle.
        """
        assert self.store is not None and self.device is not None
        await self.device.flush()
        try:
            generation, handle = await self.store.prepare_restore(name)
            try:
                # The clone carries the snapshot's epoch; writes after
                # the restore use the device's, which is newer. Record
                # it before the clone goes live, so sequences keep growing.
                await self._carry_metadata(handle)
                crash_point("restore:before-commit")
                old = await self.store.commit_restore(generation, handle)
            except StoreError:
                # Never live: left open, its tasks would outlive it.
                with contextlib.suppress(StoreError):
                    await handle.close()
                raise
        except StoreError as exc:
            raise cp.BadRequest(f"restore failed, disk unchanged: {exc}") from exc
        self.device.swap_store(handle)
        crash_point("restore:after-swap")
        handle.on_reopen = self.device.forget_clean_cache
        return generation, old

    async def _retire(self, old: SlateHandle) -> list[int]:
        """Close the previous generation and collect garbage: after the
        swap, with I/O running again, as clients need neither."""
        assert self.store is not None
        try:
            await old.close()
        except StoreError as exc:
            log.warning("closing the previous generation failed: %s", exc)
        try:
            removed = await self.store.collect_garbage()
        except StoreError as exc:
            log.warning("garbage collection failed: %s", exc)
            removed = []
        return removed
