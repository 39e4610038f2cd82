"""Volume and snapshot records, and where each volume's disk lives.

Everything sits under one root URL (``--root``), a local directory or an S3
prefix::

    <root>/volumes/<volume-id>/        the volume's portalbd storage
    <root>/csi/volumes/<id>.json       the volume record (size, block size, ...)
    <root>/csi/snapshots/<id>.json     the snapshot record (source, checkpoint)
    <root>/csi/names/<kind>-<sha>.json request name -> id, for idempotency
    <root>/csi/staged/<id>.json        which node serves the volume right now

Records are small JSON documents written whole (rename on a filesystem, one
PUT on S3), so a reader never sees half of one. A volume's storage outlives
its record while a snapshot or a cloned volume still needs its SSTs: the
record is then kept as a tombstone and the storage is purged with the last
dependant.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC240

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from portalbd.config import LsmConfig
from portalbd.store.instance import InstanceStore, generation_path
from portalbd.store.location import StorageLocation, parse_storage_url
from portalbd.store.slate import SlateAdmin, StoreError, resolve_object_store


class RecordStore(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, doc: dict[str, Any]) -> None: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...
    def delete_tree(self, prefix: str) -> None: ...


class LocalRecords:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.root / key).read_text())
        except FileNotFoundError:
            return None
        return doc

    def put(self, key: str, doc: dict[str, Any]) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as out:
            json.dump(doc, out, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def keys(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return sorted(
            f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir() if p.suffix == ".json"
        )

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


class S3Records:
    """Records as objects; the endpoint comes from the same variables SlateDB reads."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3

        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
        self.client: Any = boto3.client("s3", endpoint_url=endpoint or None)
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        doc: dict[str, Any] = json.loads(body)
        return doc

    def put(self, key: str, doc: dict[str, Any]) -> None:
        body = json.dumps(doc, sort_keys=True).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _list(self, prefix: str) -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out

    def keys(self, prefix: str) -> list[str]:
        strip = len(self._key("")) if self.prefix else 0
        folder = prefix.rstrip("/") + "/"
        found = [k[strip:].lstrip("/") for k in self._list(folder)]
        return sorted(k for k in found if k.endswith(".json") and "/" not in k[len(folder) :])

    def delete_tree(self, prefix: str) -> None:
        for key in self._list(prefix.rstrip("/") + "/"):
            self.client.delete_object(Bucket=self.bucket, Key=key)


def open_records(root_url: str) -> RecordStore:
    parts = urlsplit(root_url)
    if parts.scheme == "file":
        return LocalRecords(Path(parts.path))
    if parts.scheme == "s3":
        return S3Records(parts.netloc, parts.path)
    raise ValueError(f"--root {root_url!r}: use file:///abs/dir or s3://bucket/prefix")


def name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:40]


@dataclass(slots=True)
class VolumeRecord:
    id: str
    name: str
    capacity_bytes: int
    block_size: int
    fs_type: str
    parameters: dict[str, str] = field(default_factory=dict)
    source_snapshot: str = ""
    clone_parent: str = ""  # volume whose storage the first generation was cloned from
    created_at: int = 0
    deleted: bool = False

    def context(self) -> dict[str, str]:
        """What the node is told in volume_context (it reads the record too)."""
        return {"fsType": self.fs_type, "blockSize": str(self.block_size)}


@dataclass(slots=True)
class SnapshotRecord:
    id: str
    name: str
    source_volume_id: str
    checkpoint: str  # the portalbd snapshot name inside the source volume
    generation: int
    size_bytes: int
    created_at: int


@dataclass(slots=True)
class StageRecord:
    node_id: str
    control_socket: str
    staging_path: str


class Registry:
    """Records plus the storage they describe."""

    def __init__(self, root_url: str, lsm: LsmConfig | None = None) -> None:
        parsed = urlsplit(root_url)
        if parsed.scheme not in ("file", "s3"):
            raise ValueError(f"--root {root_url!r}: use file:///abs/dir or s3://bucket/prefix")
        self.root_url = root_url.rstrip("/")
        self.records = open_records(self.root_url)
        # Offline operations open a volume briefly: keep their caches small.
        self.lsm = lsm or LsmConfig(block_cache_size_bytes=8 << 20)

    # --- locations ------------------------------------------------------------

    def storage_url(self, volume_id: str) -> str:
        return f"{self.root_url}/volumes/{volume_id}"

    def location(self, volume_id: str) -> StorageLocation:
        return parse_storage_url(self.storage_url(volume_id))

    # --- volume records -------------------------------------------------------

    def volume(self, volume_id: str, *, include_deleted: bool = False) -> VolumeRecord | None:
        if not volume_id or "/" in volume_id:
            return None
        doc = self.records.get(f"csi/volumes/{volume_id}.json")
        if doc is None:
            return None
        record = VolumeRecord(**doc)
        if record.deleted and not include_deleted:
            return None
        return record

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        doc = self.records.get(f"csi/names/volume-{name_hash(name)}.json")
        if doc is None:
            return None
        record = self.volume(doc["id"])
        return record if record is not None and record.name == name else None

    def new_volume_id(self) -> str:
        return f"pbd-{uuid.uuid4().hex}"

    def save_volume(self, record: VolumeRecord) -> None:
        if not record.created_at:
            record.created_at = int(time.time())
        self.records.put(f"csi/volumes/{record.id}.json", asdict(record))
        if not record.deleted:
            self.records.put(f"csi/names/volume-{name_hash(record.name)}.json", {"id": record.id})

    def volumes(self) -> list[VolumeRecord]:
        out = []
        for key in self.records.keys("csi/volumes"):
            doc = self.records.get(key)
            if doc is not None and not doc.get("deleted"):
                out.append(VolumeRecord(**doc))
        out.sort(key=lambda v: (v.created_at, v.id))
        return out

    def all_volume_records(self) -> list[VolumeRecord]:
        docs = (self.records.get(k) for k in self.records.keys("csi/volumes"))
        return [VolumeRecord(**d) for d in docs if d is not None]

    # --- snapshot records -----------------------------------------------------

    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        if not snapshot_id or "/" in snapshot_id:
            return None
        doc = self.records.get(f"csi/snapshots/{snapshot_id}.json")
        return None if doc is None else SnapshotRecord(**doc)

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        doc = self.records.get(f"csi/names/snapshot-{name_hash(name)}.json")
        if doc is None:
            return None
        record = self.snapshot(doc["id"])
        return record if record is not None and record.name == name else None

    def save_snapshot(self, record: SnapshotRecord) -> None:
        self.records.put(f"csi/snapshots/{record.id}.json", asdict(record))
        self.records.put(f"csi/names/snapshot-{name_hash(record.name)}.json", {"id": record.id})

    def forget_snapshot(self, record: SnapshotRecord) -> None:
        self.records.delete(f"csi/names/snapshot-{name_hash(record.name)}.json")
        self.records.delete(f"csi/snapshots/{record.id}.json")

    def snapshots(self) -> list[SnapshotRecord]:
        docs = (self.records.get(k) for k in self.records.keys("csi/snapshots"))
        out = [SnapshotRecord(**d) for d in docs if d is not None]
        out.sort(key=lambda s: (s.created_at, s.id))
        return out

    # --- staging markers --------------------------------------------------------

    def staged(self, volume_id: str) -> StageRecord | None:
        doc = self.records.get(f"csi/staged/{volume_id}.json")
        return None if doc is None else StageRecord(**doc)

    def mark_staged(self, volume_id: str, record: StageRecord) -> None:
        self.records.put(f"csi/staged/{volume_id}.json", asdict(record))

    def clear_staged(self, volume_id: str) -> None:
        self.records.delete(f"csi/staged/{volume_id}.json")

    # --- deletion ---------------------------------------------------------------

    def dependants(self, volume_id: str) -> list[str]:
        """Snapshots and cloned volumes that still read this volume's storage."""
        snaps = [s.id for s in self.snapshots() if s.source_volume_id == volume_id]
        clones = [
            v.id
            for v in self.all_volume_records()
            if v.clone_parent == volume_id and v.id != volume_id
        ]
        return snaps + clones

    def delete_volume(self, record: VolumeRecord) -> None:
        """Forget the volume; purge its storage unless something still reads it."""
        self.records.delete(f"csi/names/volume-{name_hash(record.name)}.json")
        record.deleted = True
        self.records.put(f"csi/volumes/{record.id}.json", asdict(record))
        self.purge_if_unused(record.id)

    def purge_if_unused(self, volume_id: str) -> None:
        record = self.volume(volume_id, include_deleted=True)
        if record is None or not record.deleted or self.dependants(volume_id):
            return
        self.records.delete_tree(f"volumes/{volume_id}")
        self.records.delete(f"csi/volumes/{volume_id}.json")
        if record.clone_parent:
            self.purge_if_unused(record.clone_parent)

    # --- storage operations (the volume must not be served while these run) ----

    async def snapshot_offline(self, volume_id: str, checkpoint: str, size: int) -> int:
        """Checkpoint a volume nobody serves; returns the generation it lives in."""
        store = await InstanceStore.open(self.location(volume_id), self.lsm)
        try:
            existing = store.catalog.find(checkpoint)
            if existing is not None:
                return existing.generation
            record = await store.create_snapshot(checkpoint, size)
            return record.generation
        finally:
            await store.close()

    async def delete_snapshot_offline(self, volume_id: str, checkpoint: str) -> None:
        store = await InstanceStore.open(self.location(volume_id), self.lsm)
        try:
            if store.catalog.find(checkpoint) is not None:
                await store.delete_snapshot(checkpoint)
        finally:
            await store.close()

    async def clone_snapshot(self, snapshot: SnapshotRecord, target_volume_id: str) -> None:
        """Make the target's first generation a clone of the snapshot's checkpoint."""
        source = self.location(snapshot.source_volume_id)
        target = self.location(target_volume_id)
        if target.kind == "file":
            Path("/" + target.prefix).mkdir(parents=True, exist_ok=True)
        object_store = resolve_object_store(source.store_url)
        source_path = generation_path(source, snapshot.generation)
        checkpoint_id = await find_checkpoint(object_store, source_path, snapshot.checkpoint)
        if checkpoint_id is None:
            raise StoreError(f"snapshot {snapshot.id}: its checkpoint is gone from {source_path}")
        await SlateAdmin(object_store, source_path).clone_to(
            generation_path(target, 1), checkpoint_id
        )


async def find_checkpoint(object_store: Any, db_path: str, name: str) -> str | None:
    """The id of the named checkpoint of a database (safe while a daemon serves it)."""
    return await SlateAdmin(object_store, db_path).find_checkpoint(name)
