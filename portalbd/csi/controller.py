"""The Controller service: volumes and snapshots as records plus storage.

Requests are serialised by one lock: the sidecars send few of them, and it
makes "idempotent by name" a simple look-up-then-create.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from portalbd.config import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from portalbd.control.async_client import request_once
from portalbd.csi import errors as e
from portalbd.csi import keys
from portalbd.csi.common import (
    DEFAULT_FS_TYPE,
    FS_MIN_BYTES,
    FS_TYPES,
    capability_problem,
    check_capabilities,
    rpc,
)
from portalbd.csi.mounts import is_mounted, run
from portalbd.csi.proto import csi_pb2 as pb
from portalbd.csi.proto import csi_pb2_grpc as pb_grpc
from portalbd.csi.supervisor import refuse_cut_off
from portalbd.csi.volumes import Registry, SnapshotRecord, VolumeRecord, name_hash

log = logging.getLogger("portalbd.csi")

GIB = 1 << 30
DEFAULT_CAPACITY = GIB
MAX_CAPACITY = 1 << 44  # 16 TiB
DEFAULT_BLOCK_SIZE = 64 * 1024
K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"

RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.EXPAND_VOLUME,
)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def parse_parameters(params: dict[str, str]) -> tuple[str, int]:
    """(fsType, blockSize) from StorageClass parameters."""
    fs_type = DEFAULT_FS_TYPE
    block_size = DEFAULT_BLOCK_SIZE
    for key, value in params.items():
        if key.startswith(K8S_PARAMETER_PREFIX):
            continue
        if key == "fsType":
            if value not in FS_TYPES:
                raise e.invalid(f"parameter fsType={value!r}: use one of {', '.join(FS_TYPES)}")
            fs_type = value
        elif key == "blockSize":
            try:
                block_size = int(value)
            except ValueError:
                raise e.invalid(f"parameter blockSize={value!r} is not a number") from None
            if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
                raise e.invalid(
                    f"parameter blockSize={value}: must be a power of two from "
                    f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
                )
        elif key == keys.PARAMETER:
            keys.check_parameter(value)
        else:
            raise e.invalid(
                f"unknown parameter {key!r} (supported: fsType, blockSize, {keys.PARAMETER})"
            )
    return fs_type, block_size


def choose_capacity(
    capacity_range: Any,
    block_size: int,
    default: int = DEFAULT_CAPACITY,
    minimum: int = 0,
    why_minimum: str = "",
) -> int:
    """The size to give a volume: the request rounded *up* to whole blocks.

    Never truncated: a size that cannot be rounded up within the limit is
    refused rather than made smaller than asked. ``minimum`` (a snapshot's
    size, a filesystem's smallest device) raises a smaller request to it:
    the spec makes required_bytes a floor and limit_bytes the only ceiling,
    so a bigger volume within the limit answers the request.
    """
    required = capacity_range.required_bytes if capacity_range is not None else 0
    limit = capacity_range.limit_bytes if capacity_range is not None else 0
    if required < 0 or limit < 0:
        raise e.invalid("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise e.out_of_range(f"required_bytes {required} is more than limit_bytes {limit}")
    if limit and limit < max(minimum, block_size):
        raise e.out_of_range(
            f"limit_bytes {limit} is below the smallest possible volume "
            f"({max(minimum, block_size)} bytes{why_minimum})"
        )
    if required:
        size = round_up(max(required, minimum), block_size)
    else:
        size = round_up(max(default, minimum), block_size)
        if limit and size > limit:
            size = limit // block_size * block_size
    if limit and size > limit:
        raise e.out_of_range(
            f"{required} bytes rounded up to whole {block_size}-byte blocks is {size}, "
            f"more than limit_bytes {limit}"
        )
    if size > MAX_CAPACITY:
        raise e.out_of_range(f"{size} bytes is more than the largest volume ({MAX_CAPACITY})")
    return size


def fits(capacity: int, capacity_range: Any) -> bool:
    if capacity_range is None:
        return True
    if capacity < capacity_range.required_bytes:
        return False
    return not (capacity_range.limit_bytes and capacity > capacity_range.limit_bytes)


def page(items: list[Any], max_entries: int, token: str) -> tuple[list[Any], str]:
    if max_entries < 0:
        raise e.invalid("max_entries must not be negative")
    start = 0
    if token:
        try:
            start = int(token)
        except ValueError:
            raise e.aborted(f"invalid starting_token {token!r}") from None
        if not 0 <= start <= len(items):
            raise e.aborted(f"starting_token {token!r} is stale")
    end = len(items) if not max_entries else min(len(items), start + max_entries)
    return items[start:end], (str(end) if end < len(items) else "")


def volume_message(record: VolumeRecord) -> Any:
    volume = pb.Volume(
        volume_id=record.id, capacity_bytes=record.capacity_bytes, volume_context=record.context()
    )
    if record.source_snapshot:
        volume.content_source.snapshot.snapshot_id = record.source_snapshot
    return volume


def snapshot_message(record: SnapshotRecord) -> Any:
    snap = pb.Snapshot(
        snapshot_id=record.id,
        source_volume_id=record.source_volume_id,
        size_bytes=record.size_bytes,
        ready_to_use=True,
    )
    snap.creation_time.seconds = record.created_at
    return snap


def checkpoint_name(snapshot_name: str) -> str:
    """A portalbd snapshot name for any CSI name (those allow more characters)."""
    return f"csi-{name_hash(snapshot_name)[:32]}"


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.lock = asyncio.Lock()

    # --- volumes ------------------------------------------------------------

    @rpc
    async def CreateVolume(self, request: Any, context: Any) -> Any:
        name = e.require(request.name, "name")
        check_capabilities(request.volume_capabilities)
        fs_type, block_size = parse_parameters(dict(request.parameters))
        for cap in request.volume_capabilities:
            if cap.WhichOneof("access_type") == "mount" and cap.mount.fs_type:
                fs_type = cap.mount.fs_type
        crange = request.capacity_range if request.HasField("capacity_range") else None
        source_kind = (
            request.volume_content_source.WhichOneof("type")
            if request.HasField("volume_content_source")
            else None
        )
        if source_kind == "volume":
            raise e.invalid("cloning a volume directly is not supported; snapshot it first")
        snapshot_id = (
            request.volume_content_source.snapshot.snapshot_id if source_kind == "snapshot" else ""
        )
        async with self.lock:
            existing = self.registry.volume_by_name(name)
            if existing is not None:
                if (
                    not fits(existing.capacity_bytes, crange)
                    or existing.source_snapshot != snapshot_id
                    or existing.fs_type != fs_type
                    or existing.block_size != block_size
                ):
                    raise e.exists(
                        f"volume {name!r} exists ({existing.id}, {existing.capacity_bytes} bytes) "
                        "with different size, source or parameters"
                    )
                return pb.CreateVolumeResponse(volume=volume_message(existing))
            snapshot = None
            mounted = any(
                cap.WhichOneof("access_type") == "mount" for cap in request.volume_capabilities
            )
            # A volume too small for its filesystem would be created and then fail
            # every NodeStageVolume (mkfs refuses it): raise the size to the
            # filesystem's minimum, or refuse a limit below it up front. The spec's
            # code for a capacity range the plugin cannot serve is OUT_OF_RANGE.
            minimum = FS_MIN_BYTES[fs_type] if mounted else 0
            why = f": the smallest {fs_type} filesystem" if mounted else ""
            default = DEFAULT_CAPACITY
            if snapshot_id:
                snapshot = self.registry.snapshot(snapshot_id)
                if snapshot is None:
                    raise e.not_found(f"snapshot {snapshot_id!r} does not exist")
                source = self.registry.volume(snapshot.source_volume_id, include_deleted=True)
                if source is None:
                    raise e.not_found(f"snapshot {snapshot_id!r} lost its source volume")
                block_size = source.block_size
                if snapshot.size_bytes >= minimum:
                    minimum, why = snapshot.size_bytes, ": the snapshot's size"
                default = max(minimum, snapshot.size_bytes)
                sealed = keys.is_encrypted(source.parameters)
                if sealed != keys.is_encrypted(request.parameters):
                    # a clone shares its source's disk id and key (docs/security.md)
                    raise e.invalid(
                        f"snapshot {snapshot_id} is of {'an encrypted' if sealed else 'a plain'} "
                        f"volume: a volume made from it must be {'' if sealed else 'un'}encrypted "
                        "too (StorageClass parameter encrypted), staged with the source's key"
                    )
            capacity = choose_capacity(
                crange, block_size, default=default, minimum=minimum, why_minimum=why
            )
            if snapshot is not None and capacity < snapshot.size_bytes:
                raise e.out_of_range(
                    f"snapshot {snapshot_id} is {snapshot.size_bytes} bytes; "
                    f"a volume of {capacity} bytes cannot hold it"
                )
            record = VolumeRecord(
                id=self.registry.new_volume_id(),
                name=name,
                capacity_bytes=capacity,
                block_size=block_size,
                fs_type=fs_type,
                parameters=dict(request.parameters),
                source_snapshot=snapshot_id,
                clone_parent=snapshot.source_volume_id if snapshot is not None else "",
                created_at=int(time.time()),
            )
            if snapshot is not None:
                await self.registry.clone_snapshot(snapshot, record.id)
            self.registry.save_volume(record)
            log.info("created volume %s name=%s size=%d", record.id, name, capacity)
            return pb.CreateVolumeResponse(volume=volume_message(record))

    @rpc
    async def DeleteVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        async with self.lock:
            record = self.registry.volume(volume_id)
            if record is None:
                return pb.DeleteVolumeResponse()
            staged = self.registry.staged(volume_id)
            if staged is not None:
                raise e.precondition(
                    f"volume {volume_id} is staged on node {staged.node_id}; unstage it first"
                )
            self.registry.delete_volume(record)
            log.info("deleted volume %s", volume_id)
        return pb.DeleteVolumeResponse()

    @rpc
    async def ValidateVolumeCapabilities(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise e.invalid("volume capabilities are required")
        record = self.registry.volume(volume_id)
        if record is None:
            raise e.not_found(f"volume {volume_id} does not exist")
        for cap in request.volume_capabilities:
            problem = capability_problem(cap)
            if problem:
                return pb.ValidateVolumeCapabilitiesResponse(message=problem)
        # The spec: the request's volume_context must be the volume's, and only
        # what the plugin supports is confirmed (parameters included).
        ours = record.context()
        differ = sorted(k for k, v in request.volume_context.items() if ours.get(k) != v)
        if differ:
            theirs = ", ".join(f"{k}={ours.get(k, '')!r}" for k in differ)
            return pb.ValidateVolumeCapabilitiesResponse(
                message=f"volume_context does not match the volume's ({theirs})"
            )
        try:
            parse_parameters(dict(request.parameters))
        except e.CsiError as exc:
            return pb.ValidateVolumeCapabilitiesResponse(message=exc.message)
        response = pb.ValidateVolumeCapabilitiesResponse()
        response.confirmed.volume_capabilities.extend(request.volume_capabilities)
        response.confirmed.volume_context.update(request.volume_context)
        response.confirmed.parameters.update(request.parameters)
        return response

    @rpc
    async def ListVolumes(self, request: Any, context: Any) -> Any:
        records, token = page(self.registry.volumes(), request.max_entries, request.starting_token)
        entries = [pb.ListVolumesResponse.Entry(volume=volume_message(r)) for r in records]
        return pb.ListVolumesResponse(entries=entries, next_token=token)

    @rpc
    async def GetCapacity(self, request: Any, context: Any) -> Any:
        for cap in request.volume_capabilities:
            if capability_problem(cap):
                return pb.GetCapacityResponse(available_capacity=0)
        fs_type, _ = parse_parameters(dict(request.parameters))
        mounts = [c for c in request.volume_capabilities if c.WhichOneof("access_type") == "mount"]
        fs_type = next((c.mount.fs_type for c in mounts if c.mount.fs_type), fs_type)
        root = urlsplit(self.registry.root_url)
        if root.scheme == "file":
            path = Path(root.path)
            while not path.exists():
                path = path.parent
            available = shutil.disk_usage(path).free
        else:
            available = MAX_CAPACITY  # a bucket has no meaningful free space
        response = pb.GetCapacityResponse(available_capacity=available)
        response.maximum_volume_size.value = MAX_CAPACITY
        # What CreateVolume would raise a smaller request to (its filesystem's minimum).
        response.minimum_volume_size.value = FS_MIN_BYTES[fs_type] if mounts else MIN_BLOCK_SIZE
        return response

    @rpc
    async def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        caps = [pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    @rpc
    async def ControllerExpandVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise e.invalid("capacity_range is required")
        if request.HasField("volume_capability"):
            problem = capability_problem(request.volume_capability)
            if problem:  # the spec's "exceeds capabilities" for this RPC
                raise e.invalid(problem)
        async with self.lock:
            record = self.registry.volume(volume_id)
            if record is None:
                raise e.not_found(f"volume {volume_id} does not exist")
            block = (
                request.HasField("volume_capability")
                and request.volume_capability.WhichOneof("access_type") == "block"
            )
            wanted = choose_capacity(request.capacity_range, record.block_size)
            limit = request.capacity_range.limit_bytes
            if limit and record.capacity_bytes > limit:
                raise e.out_of_range(
                    f"volume {volume_id} is already {record.capacity_bytes} bytes, more than "
                    f"limit_bytes {limit} (volumes never shrink)"
                )
            if wanted <= record.capacity_bytes:
                return pb.ControllerExpandVolumeResponse(
                    capacity_bytes=record.capacity_bytes, node_expansion_required=not block
                )
            # Online expansion: the record is the size; a staged volume's node
            # serves it in NodeExpandVolume (a block volume too: its daemon and
            # device grow there), an unstaged one at its next stage.
            staged = self.registry.staged(volume_id) is not None
            record.capacity_bytes = wanted
            self.registry.save_volume(record)
            log.info("expanded volume %s to %d bytes", volume_id, wanted)
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=wanted, node_expansion_required=staged or not block
        )

    # --- snapshots ----------------------------------------------------------

    @rpc
    async def CreateSnapshot(self, request: Any, context: Any) -> Any:
        source_id = e.require(request.source_volume_id, "source_volume_id")
        name = e.require(request.name, "name")
        async with self.lock:
            existing = self.registry.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_id:
                    raise e.exists(
                        f"snapshot {name!r} exists for another volume ({existing.source_volume_id})"
                    )
                return pb.CreateSnapshotResponse(snapshot=snapshot_message(existing))
            volume = self.registry.volume(source_id)
            if volume is None:
                raise e.not_found(f"volume {source_id} does not exist")
            checkpoint = checkpoint_name(name)
            generation = await self._checkpoint(volume, checkpoint)
            record = SnapshotRecord(
                id=f"pbs-{uuid.uuid4().hex}",
                name=name,
                source_volume_id=source_id,
                checkpoint=checkpoint,
                generation=generation,
                size_bytes=volume.capacity_bytes,
                created_at=int(time.time()),
            )
            self.registry.save_snapshot(record)
            log.info("created snapshot %s of %s name=%s", record.id, source_id, name)
            return pb.CreateSnapshotResponse(snapshot=snapshot_message(record))

    async def _checkpoint(self, volume: VolumeRecord, checkpoint: str) -> int:
        """Snapshot through the serving daemon if there is one, else offline."""
        staged = self.registry.staged(volume.id)
        if staged is None:
            return await self.registry.snapshot_offline(
                volume.id, checkpoint, volume.capacity_bytes
            )
        socket = Path(staged.control_socket)
        if not socket.exists():
            raise e.unavailable(
                f"volume {volume.id} is served on node {staged.node_id}, whose control socket "
                f"{socket} is not reachable from this controller"
            )
        # the daemon's state directory holds the control socket
        refuse_cut_off(volume.id, socket.parent)
        # Freeze the mounted filesystem so the checkpoint holds a consistent
        # one: freezing writes every dirty page down to the daemon first.
        frozen = staged.staging_path if is_mounted(staged.staging_path) else ""
        if frozen:
            await run("fsfreeze", "--freeze", frozen)
        try:
            reply = await request_once(socket, {"SnapshotCreate": {"name": checkpoint}})
            if isinstance(reply, dict) and "already exists" in str(reply.get("Error", "")):
                reply = await request_once(socket, {"SnapshotGet": {"name": checkpoint}})
        finally:
            if frozen:
                await run("fsfreeze", "--unfreeze", frozen)
        if not isinstance(reply, dict) or "Snapshot" not in reply:
            raise e.internal(f"daemon for volume {volume.id} refused the snapshot: {reply}")
        return int(reply["Snapshot"]["generation"])

    @rpc
    async def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        snapshot_id = e.require(request.snapshot_id, "snapshot_id")
        async with self.lock:
            record = self.registry.snapshot(snapshot_id)
            if record is None:
                return pb.DeleteSnapshotResponse()
            staged = self.registry.staged(record.source_volume_id)
            if staged is not None:
                socket = Path(staged.control_socket)
                if not socket.exists():
                    raise e.unavailable(
                        f"source volume {record.source_volume_id} is served on node "
                        f"{staged.node_id}; its control socket is not reachable from here"
                    )
                reply = await request_once(socket, {"SnapshotDelete": {"name": record.checkpoint}})
                if reply != "Ok" and "not found" not in str(reply):
                    raise e.internal(f"daemon refused to delete the snapshot: {reply}")
            elif self.registry.volume(record.source_volume_id, include_deleted=True) is not None:
                await self.registry.delete_snapshot_offline(
                    record.source_volume_id, record.checkpoint
                )
            self.registry.forget_snapshot(record)
            self.registry.purge_if_unused(record.source_volume_id)
            log.info("deleted snapshot %s", snapshot_id)
        return pb.DeleteSnapshotResponse()

    @rpc
    async def ListSnapshots(self, request: Any, context: Any) -> Any:
        records = self.registry.snapshots()
        if request.snapshot_id:
            records = [r for r in records if r.id == request.snapshot_id]
        if request.source_volume_id:
            records = [r for r in records if r.source_volume_id == request.source_volume_id]
        chosen, token = page(records, request.max_entries, request.starting_token)
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=snapshot_message(r)) for r in chosen]
        return pb.ListSnapshotsResponse(entries=entries, next_token=token)
