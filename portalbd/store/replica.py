"""A read replica: another daemon's disk, read without ever writing to its storage.

``--read-only`` opens the catalog and the data with SlateDB's ``DbReader``:
no writer epoch is taken, so the daemon that owns the disk is never fenced,
nothing is written (no catalog, no metadata, no epoch bump) and no garbage
is collected. It works from any host that can read the storage.

Two modes:

* **follow** (default): the live generation as the writer flushes it. The
  reader polls the manifest every ``poll_interval_ms``; the catalog is polled
  too, so a restore on the writer (a new live generation) is followed.
* **snapshot** (``--snapshot NAME``): the snapshot's checkpoint, which never
  changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portalbd.config import LsmConfig
from portalbd.store.instance import (
    CATALOG_KEY,
    Catalog,
    InstanceStore,
    SnapshotRecord,
    generation_path,
)
from portalbd.store.location import StorageLocation
from portalbd.store.object_metrics import ObjectStoreCounters
from portalbd.store.original import OriginalLayoutError, find_original, has_database, refusal
from portalbd.store.slate import SlateHandle, StoreError, resolve_object_store

if TYPE_CHECKING:
    from portalbd.store.s3 import S3Settings

POLL_INTERVAL_MS = 500
REFUSED = "this daemon is a read-only replica (--read-only): {what} is done by the writer"


@dataclass(slots=True)
class ReplicaState:
    """What status reports about the replica."""

    mode: str  # "follow" or "snapshot"
    snapshot: str | None
    poll_interval_ms: int
    # monotonic time of the last catalog poll that succeeded, and of the
    # last change of the data's durable sequence number
    polled_at: float = field(default_factory=time.monotonic)
    changed_at: float = field(default_factory=time.monotonic)
    durable_seq: int | None = None
    last_error: str | None = None

    def public(self, generation: int) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "mode": self.mode,
            "snapshot": self.snapshot,
            "generation": generation,
            "poll_interval_ms": self.poll_interval_ms,
            # what the replica may miss of the writer's flushed writes: at
            # most about one poll interval, plus the time since it last
            # managed to poll
            "lag_bound_ms": None
            if self.mode == "snapshot"
            else round((now - self.polled_at) * 1000 + self.poll_interval_ms),
            "since_change_s": round(now - self.changed_at, 3),
            "durable_seq": self.durable_seq,
            "last_error": self.last_error,
        }


class ReplicaStore(InstanceStore):
    """InstanceStore's reading half; every action that would write is refused."""

    def __init__(self, *args: Any, state: ReplicaState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = state

    @classmethod
    async def open_replica(
        cls,
        location: StorageLocation,
        lsm: LsmConfig,
        *,
        snapshot: str | None = None,
        s3: S3Settings | None = None,
        poll_interval_ms: int = POLL_INTERVAL_MS,
    ) -> ReplicaStore:
        if location.kind == "memory":
            raise StoreError(
                "--read-only serves another daemon's disk; memory:// storage belongs to "
                "one process and cannot be shared (use file:// or s3://)"
            )
        object_store = resolve_object_store(location.store_url, s3)
        catalog_path = location.path("catalog")
        if not await has_database(object_store, catalog_path):
            original = await find_original(object_store, location)
            if original is not None:
                raise OriginalLayoutError(refusal(location, original))
            raise StoreError(
                f"no portalbd disk at {location.display} (no catalog); a read-only replica "
                "never creates one: start the writer on it first"
            )
        metrics = ObjectStoreCounters()
        catalog_db = await SlateHandle.open_reader(
            object_store, catalog_path, lsm, poll_interval_ms=poll_interval_ms, small=True
        )
        try:
            catalog = await read_catalog(catalog_db)
            record = find_snapshot(catalog, snapshot) if snapshot is not None else None
            generation = catalog.live_generation if record is None else record.generation
            data = await SlateHandle.open_reader(
                object_store,
                generation_path(location, generation),
                lsm,
                checkpoint=None if record is None else record.checkpoint_id,
                poll_interval_ms=poll_interval_ms,
                metrics=metrics,
            )
        except BaseException:
            await catalog_db.close()
            raise
        state = ReplicaState(
            mode="follow" if snapshot is None else "snapshot",
            snapshot=snapshot,
            poll_interval_ms=poll_interval_ms,
            durable_seq=data.durable_seq(),
        )
        store = cls(
            location, object_store, catalog_db, catalog, data, lsm, None, metrics, state=state
        )
        store.generation = generation
        store._watch(data)
        return store

    # The generation served: the live one (follow) or the snapshot's.
    generation: int = 0

    async def poll(self) -> SlateHandle | None:
        """Re-read the catalog; in follow mode, open a new live generation if it moved.

        Returns the new data handle for the caller to swap in (and then close
        the old one with :meth:`retire`), or None.
        """
        state = self.state
        try:
            self.catalog = await read_catalog(self._catalog_db)
        except StoreError as exc:
            state.last_error = str(exc)
            return None
        state.polled_at = time.monotonic()
        state.last_error = None
        if state.snapshot is not None and self.catalog.find(state.snapshot) is None:
            # its checkpoint is gone: the writer's GC may now delete what we read
            state.last_error = (
                f"snapshot {state.snapshot!r} was deleted by the writer; "
                "reads may fail once its files are collected"
            )
        seq = self.data.durable_seq()
        if seq != state.durable_seq:
            state.durable_seq, state.changed_at = seq, time.monotonic()
        if state.mode != "follow" or self.catalog.live_generation == self.generation:
            return None
        return await SlateHandle.open_reader(
            self.object_store,
            generation_path(self.location, self.catalog.live_generation),
            self.lsm,
            poll_interval_ms=state.poll_interval_ms,
            metrics=self.object_metrics,
        )

    async def retire(self, handle: SlateHandle) -> SlateHandle:
        """Make a handle from :meth:`poll` the served one; returns the old one to close."""
        old, self.data = self.data, handle
        self.generation = self.catalog.live_generation
        self.state.durable_seq, self.state.changed_at = handle.durable_seq(), time.monotonic()
        self._watch(handle)
        return old

    def fenced(self) -> bool:
        return False  # a reader holds no epoch: nothing can fence it

    def public(self) -> dict[str, Any]:
        return self.state.public(self.generation)

    async def create_snapshot(self, name: str, size_bytes: int) -> SnapshotRecord:
        raise StoreError(REFUSED.format(what="taking a snapshot"))

    async def delete_snapshot(self, name: str) -> None:
        raise StoreError(REFUSED.format(what="deleting a snapshot"))

    async def prepare_restore(self, name: str) -> tuple[int, SlateHandle]:
        raise StoreError(REFUSED.format(what="a restore"))

    async def collect_garbage(self) -> list[int]:
        return []  # the writer's job: a replica deletes nothing


async def read_catalog(catalog_db: SlateHandle) -> Catalog:
    raw = await catalog_db.get(CATALOG_KEY)
    if raw is None:
        raise StoreError("the catalog is empty: the writer has not finished creating the disk")
    return Catalog.decode(raw)


def find_snapshot(catalog: Catalog, name: str) -> SnapshotRecord:
    record = catalog.find(name)
    if record is None:
        names = ", ".join(s.name for s in catalog.snapshots) or "none"
        raise StoreError(f"no snapshot {name!r} to serve (snapshots: {names})")
    return record
