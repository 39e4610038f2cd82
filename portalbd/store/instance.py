"""An instance's storage: the catalog, the live generation, snapshots.

Layout inside the object store, under the instance prefix::

    catalog/          a tiny SlateDB holding one JSON document (below)
    gen/00000001/     the disk's blocks, one SlateDB per generation
    gen/00000002/     a clone of some snapshot, made by a restore

The catalog names the live generation and every snapshot as (generation,
checkpoint id). It lives in its own database so updating it is one atomic,
durable put, and so opening it fences any older daemon on the same storage.
A restore clones a checkpoint into a new generation and switches the live
pointer last: a crash at any point leaves the old or the new generation
live, never neither, and no snapshot is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portalbd.config import LsmConfig
from portalbd.faults import crash_point
from portalbd.private import make_private_dir
from portalbd.store.location import StorageLocation
from portalbd.store.object_metrics import ObjectStoreCounters
from portalbd.store.original import OriginalLayoutError, find_original, has_database, refusal
from portalbd.store.slate import (
    SlateAdmin,
    SlateHandle,
    StoreCounters,
    StoreError,
    resolve_object_store,
)

if TYPE_CHECKING:
    from portalbd.store.s3 import S3Settings

log = logging.getLogger("portalbd.store")


CATALOG_KEY = b"catalog"
CATALOG_FORMAT = 1


@dataclass(slots=True)
class SnapshotRecord:
    id: str
    name: str
    created_at: int
    generation: int
    checkpoint_id: str
    size_bytes: int = 0

    def public(self) -> dict[str, Any]:
        """What the control protocol shows (the checkpoint id stays inside)."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "generation": self.generation,
            "size_bytes": self.size_bytes,
        }


@dataclass(slots=True)
class Catalog:
    live_generation: int = 1
    next_generation: int = 2
    # generation -> the generation it was cloned from (None for the first)
    parents: dict[int, int | None] = field(default_factory=lambda: {1: None})
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    # Names this disk in caches outside the store (the local object cache):
    # a disk deleted and made again at the same URL gets a new one. Empty in
    # catalogs written before it existed, until the next open writes one.
    disk_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "format": CATALOG_FORMAT,
                "live_generation": self.live_generation,
                "next_generation": self.next_generation,
                "parents": {str(k): v for k, v in self.parents.items()},
                "snapshots": [asdict(s) for s in self.snapshots],
                "disk_id": self.disk_id,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Catalog:
        doc = json.loads(raw)
        if doc.get("format") != CATALOG_FORMAT:
            raise StoreError(f"catalog format {doc.get('format')} is not supported")
        return cls(
            live_generation=int(doc["live_generation"]),
            next_generation=int(doc["next_generation"]),
            parents={int(k): v for k, v in doc["parents"].items()},
            snapshots=[SnapshotRecord(**s) for s in doc["snapshots"]],
            disk_id=str(doc.get("disk_id", "")),
        )

    def find(self, name: str) -> SnapshotRecord | None:
        for snap in self.snapshots:
            if snap.name == name:
                return snap
        return None

    def unreferenced_generations(self) -> list[int]:
        """Generations nothing needs: not live, no snapshot, no clone child."""
        needed = {self.live_generation} | {s.generation for s in self.snapshots}
        alive = set(self.parents)
        changed = True
        while changed:
            changed = False
            for gen in sorted(alive):
                has_child = any(p == gen for g, p in self.parents.items() if g in alive)
                if gen not in needed and not has_child:
                    alive.discard(gen)
                    changed = True
        return sorted(set(self.parents) - alive)


def generation_path(location: StorageLocation, generation: int) -> str:
    return location.path("gen", f"{generation:08d}")


class InstanceStore:
    """Opens and switches the databases of one instance."""

    def __init__(
        self,
        location: StorageLocation,
        object_store: Any,
        catalog_db: SlateHandle,
        catalog: Catalog,
        data: SlateHandle,
        lsm: LsmConfig,
        max_retries: int | None,
        object_metrics: ObjectStoreCounters | None = None,
    ) -> None:
        self.location = location
        self.object_store = object_store
        self._catalog_db = catalog_db
        self.catalog = catalog
        self.data = data
        self.lsm = lsm
        self.max_retries = max_retries
        self.object_metrics = object_metrics or ObjectStoreCounters()

    @property
    def counters(self) -> StoreCounters:
        return self.data.counters

    @classmethod
    async def open(
        cls,
        location: StorageLocation,
        lsm: LsmConfig,
        *,
        max_retries: int | None = None,
        s3: S3Settings | None = None,
    ) -> InstanceStore:
        if location.kind == "file":
            # The daemon's umask keeps what SlateDB creates private (private.py);
            # the root is made 0700 for what was there before.
            directory = Path("/" + location.prefix)
            await asyncio.to_thread(make_private_dir, directory)
        object_store = resolve_object_store(location.store_url, s3)
        if location.kind != "memory" and not await has_database(
            object_store, location.path("catalog")
        ):
            original = await find_original(object_store, location)
            if original is not None:
                raise OriginalLayoutError(refusal(location, original))
        metrics = ObjectStoreCounters()
        catalog_db = await SlateHandle.open(
            object_store,
            location.path("catalog"),
            lsm,
            max_retries=max_retries,
            small=True,
            metrics=metrics,
        )
        raw = await catalog_db.get(CATALOG_KEY)
        if raw is None:
            catalog = Catalog()
            await catalog_db.write([(CATALOG_KEY, catalog.encode())])
            await catalog_db.flush()
        else:
            catalog = Catalog.decode(raw)
            if not catalog.disk_id:
                catalog.disk_id = uuid.uuid4().hex
                await catalog_db.write([(CATALOG_KEY, catalog.encode())])
                await catalog_db.flush()
        if lsm.object_cache_dir is not None:
            if lsm.object_cache_bytes > 0:
                cache = Path(lsm.object_cache_dir) / catalog.disk_id
                await asyncio.to_thread(make_private_dir, cache)
                lsm = dataclasses.replace(lsm, object_cache_dir=str(cache))
            else:
                lsm = dataclasses.replace(lsm, object_cache_dir=None)
        data = await SlateHandle.open(
            object_store,
            generation_path(location, catalog.live_generation),
            lsm,
            max_retries=max_retries,
            metrics=metrics,
        )
        store = cls(location, object_store, catalog_db, catalog, data, lsm, max_retries, metrics)
        store._watch(catalog_db)
        store._watch(data)
        return store

    @property
    def object_cache_dir(self) -> str | None:
        """This disk's directory of the local object cache, if it has one."""
        return self.lsm.object_cache_dir

    def _watch(self, handle: SlateHandle) -> None:
        """On a local directory, let the handle tell full, read-only and gone."""
        if self.location.kind == "file":
            handle.watch_directory(Path("/" + handle.path))

    def fenced(self) -> bool:
        """True once a newer daemon has opened this storage (SlateDB noticed)."""
        return "fenced" in (
            self._catalog_db.status_closed_reason(),
            self.data.status_closed_reason(),
        )

    async def _commit(self, catalog: Catalog) -> None:
        """Persist a new catalog durably; only then does it take effect."""
        await self._catalog_db.write([(CATALOG_KEY, catalog.encode())])
        await self._catalog_db.flush()
        self.catalog = catalog

    async def create_snapshot(self, name: str, size_bytes: int) -> SnapshotRecord:
        """Checkpoint the live generation. The caller has drained its buffers."""
        if self.catalog.find(name) is not None:
            raise StoreError(f"snapshot {name!r} already exists")
        await self.data.flush(memtable=True)
        admin = SlateAdmin(self.object_store, self.data.path)
        checkpoint_id = await admin.create_checkpoint(name)
        record = SnapshotRecord(
            id=str(uuid.uuid4()),
            name=name,
            created_at=int(time.time()),
            generation=self.catalog.live_generation,
            checkpoint_id=checkpoint_id,
            size_bytes=size_bytes,
        )
        catalog = Catalog.decode(self.catalog.encode())
        catalog.snapshots.append(record)
        await self._commit(catalog)
        return record

    async def delete_snapshot(self, name: str) -> None:
        record = self.catalog.find(name)
        if record is None:
            raise StoreError(f"snapshot {name!r} not found")
        catalog = Catalog.decode(self.catalog.encode())
        catalog.snapshots = [s for s in catalog.snapshots if s.name != name]
        await self._commit(catalog)
        admin = SlateAdmin(self.object_store, generation_path(self.location, record.generation))
        await admin.delete_checkpoint(record.checkpoint_id)
        await self.collect_garbage()

    async def prepare_restore(self, name: str) -> tuple[int, SlateHandle]:
        """Clone a snapshot into a fresh generation and open it (not yet live).

        The generation number is reserved durably first, so a crash leaves
        at worst an orphan generation that garbage collection removes.
        """
        record = self.catalog.find(name)
        if record is None:
            raise StoreError(f"snapshot {name!r} not found")
        generation = self.catalog.next_generation
        reserved = Catalog.decode(self.catalog.encode())
        reserved.next_generation = generation + 1
        reserved.parents[generation] = record.generation
        await self._commit(reserved)
        crash_point("restore:after-reserve")
        source = SlateAdmin(self.object_store, generation_path(self.location, record.generation))
        await source.clone_to(generation_path(self.location, generation), record.checkpoint_id)
        crash_point("restore:after-clone")
        handle = await SlateHandle.open(
            self.object_store,
            generation_path(self.location, generation),
            self.lsm,
            self.data.counters,
            max_retries=self.max_retries,
            metrics=self.object_metrics,
        )
        self._watch(handle)
        return generation, handle

    async def commit_restore(self, generation: int, handle: SlateHandle) -> SlateHandle:
        """Make a prepared generation live; returns the old handle to close."""
        catalog = Catalog.decode(self.catalog.encode())
        catalog.live_generation = generation
        await self._commit(catalog)
        crash_point("restore:after-commit")
        old, self.data = self.data, handle
        return old

    async def collect_garbage(self) -> list[int]:
        """Delete generations that nothing refers to any more.

        Only generations whose database is really gone leave the catalog; one
        that could not be deleted stays listed so the next collection retries
        it instead of leaking its objects for good.
        """
        doomed = self.catalog.unreferenced_generations()
        removed: list[int] = []
        for generation in doomed:
            admin = SlateAdmin(self.object_store, generation_path(self.location, generation))
            try:
                checkpoints = await admin.list_checkpoints()
            except StoreError:
                checkpoints = []  # already deleted (a crash mid-collection): no manifest
            try:
                for checkpoint in checkpoints:
                    await admin.delete_checkpoint(checkpoint)
                await admin.delete_database()
            except StoreError as exc:
                log.warning("cannot delete unreferenced generation %d yet: %s", generation, exc)
                continue
            removed.append(generation)
            crash_point("gc:after-delete")
        if not removed:
            return []
        catalog = Catalog.decode(self.catalog.encode())
        for generation in removed:
            catalog.parents.pop(generation, None)
        await self._commit(catalog)
        return removed

    async def close(self) -> None:
        errors: list[StoreError] = []
        for handle in (self.data, self._catalog_db):
            try:
                await handle.close()
            except StoreError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
