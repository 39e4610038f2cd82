"""The Node service: serve a volume here, mount it, hand it to pods.

Stage = start the volume's portalbd (supervised), attach it as a block
device, make a filesystem if it is blank, mount it at the staging path.
Publish = bind-mount the staging mount (or the device, for raw block
volumes) into the pod's target path. Unpublish and unstage undo exactly
that; unstage stops the daemon with SIGTERM, which flushes every write to
storage before it exits. Each step checks what is already there first, so
repeating an RPC converges instead of failing.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from portalbd.csi import attach as att
from portalbd.csi import errors as e
from portalbd.csi import keys
from portalbd.csi.common import FS_TYPES, Mode, capability_problem, rpc
from portalbd.csi.mounts import detect_fs, grow_fs, is_mounted, make_fs, mount_of, run, unmount
from portalbd.csi.proto import csi_pb2 as pb
from portalbd.csi.proto import csi_pb2_grpc as pb_grpc
from portalbd.csi.supervisor import (
    CONDITION_FILE,
    DaemonSpec,
    SupervisedDaemon,
    daemon_pid,
    read_condition,
    refuse_cut_off,
)
from portalbd.csi.volumes import Registry, StageRecord, VolumeRecord

log = logging.getLogger("portalbd.csi")

NodeRPC = pb.NodeServiceCapability.RPC
STAGE_FIELDS = ("block", "fs_type", "mode", "mount_flags")  # what must match to stage again


async def device_size(device: str) -> int:
    return int((await run("blockdev", "--getsize64", device)).strip())


def check_node_capability(request: Any) -> Any:
    """The request's capability; a missing one is INVALID_ARGUMENT, and one this
    driver cannot serve FAILED_PRECONDITION (the node RPCs' "exceeds capabilities")."""
    if not request.HasField("volume_capability"):
        raise e.invalid("volume_capability is required")
    cap = request.volume_capability
    problem = capability_problem(cap)
    if problem and (not cap.HasField("access_mode") or cap.WhichOneof("access_type") is None):
        raise e.invalid(problem)
    if problem:
        raise e.precondition(problem)
    return cap


def describe(state: dict[str, Any]) -> str:
    """How a volume is staged, in the words of an error message."""
    kind = "a block volume" if state["block"] else f"{state['fs_type']}"
    mode = state.get("mode")
    flags = state.get("mount_flags") or []
    return " ".join(
        [kind]
        + ([f"mode {Mode.Name(mode)}"] if mode is not None else [])
        + ([f"flags {','.join(flags)}"] if flags else [])
    )


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, registry: Registry, node_id: str, state_root: Path) -> None:
        self.registry = registry
        self.node_id = node_id
        self.state_root = state_root
        self.daemons: dict[str, SupervisedDaemon] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    def state_dir(self, volume_id: str) -> Path:
        if not volume_id or "/" in volume_id or volume_id.startswith("."):
            raise e.invalid(f"invalid volume_id {volume_id!r}")
        return self.state_root / volume_id

    def _daemon_spec(
        self, volume_id: str, record: VolumeRecord, key_file: Path | None
    ) -> DaemonSpec:
        """How this node runs the volume's daemon: its record's size and block size."""
        return DaemonSpec(
            volume_id=volume_id,
            storage_url=self.registry.storage_url(volume_id),
            size_bytes=record.capacity_bytes,
            block_size=record.block_size,
            state_dir=self.state_dir(volume_id),
            key_file=key_file,
        )

    def _read_state(self, volume_id: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.state_dir(volume_id) / "stage.json").read_text())
        except FileNotFoundError:
            return None
        return doc

    def _refuse_cut_off(self, volume_id: str) -> None:
        refuse_cut_off(volume_id, self.state_dir(volume_id))

    def _staged_spec(self, volume_id: str, record: VolumeRecord) -> DaemonSpec:
        """The daemon spec of a volume staged already (its key file, if any, in place)."""
        key_file = self.state_dir(volume_id) / keys.KEY_FILE
        return self._daemon_spec(volume_id, record, key_file if key_file.exists() else None)

    async def _supervise(self, volume_id: str, spec: DaemonSpec) -> SupervisedDaemon:
        """The volume's supervised daemon: ours, started from ``spec`` if there is
        none yet, or adopted from an earlier driver."""
        daemon = self.daemons.get(volume_id)
        if daemon is None:
            daemon = SupervisedDaemon(spec)
            await daemon.start()
            self.daemons[volume_id] = daemon
        return daemon

    async def adopt_staged(self) -> None:
        """Supervise the daemons of volumes an earlier driver staged here, now.

        Otherwise a daemon is adopted only by the next RPC on its volume, and
        one that died while no driver ran would be noticed (and its device cut
        off) only then: SupervisedDaemon.start does both."""
        if not self.state_root.is_dir():
            return
        for state_dir in sorted(self.state_root.iterdir()):
            volume_id = state_dir.name
            if not (state_dir / "stage.json").exists():
                continue
            async with self.lock(volume_id):
                record = self.registry.volume(volume_id)
                if record is None:
                    log.warning("volume %s is staged here but has no record", volume_id)
                    continue
                try:
                    await self._supervise(volume_id, self._staged_spec(volume_id, record))
                except Exception:
                    log.exception("adopting the daemon of volume %s failed", volume_id)

    # --- stage ----------------------------------------------------------------

    @rpc
    async def NodeStageVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        staging = e.require(request.staging_target_path, "staging_target_path")
        cap = check_node_capability(request)
        block = cap.WhichOneof("access_type") == "block"
        state_dir = self.state_dir(volume_id)
        async with self.lock(volume_id):
            record = self.registry.volume(volume_id)
            if record is None:
                raise e.not_found(f"volume {volume_id} does not exist")
            state = self._read_state(volume_id)
            if state is not None and state["staging_path"] != staging:
                raise e.exists(
                    f"volume {volume_id} is already staged at {state['staging_path']} on this node"
                )
            fs_type = (cap.mount.fs_type if not block else "") or record.fs_type
            if not block and fs_type not in FS_TYPES:
                raise e.precondition(f"filesystem {fs_type!r} is not supported")
            wanted = {
                "staging_path": staging,
                "block": block,
                "fs_type": fs_type,
                "mode": cap.access_mode.mode,
                "mount_flags": [] if block else list(cap.mount.mount_flags),
            }
            if state is not None and any(
                k in state and state[k] != wanted[k] for k in STAGE_FIELDS
            ):
                # The spec: staged at this path but incompatible with the capability
                # is ALREADY_EXISTS; the stage stays exactly as it is.
                raise e.exists(
                    f"volume {volume_id} is already staged at {staging} as {describe(state)}, "
                    f"not {describe(wanted)}: unstage it first"
                )
            if state is not None:
                self._refuse_cut_off(volume_id)
            other = self.registry.staged(volume_id)
            if other is not None and other.node_id != self.node_id:
                log.warning(
                    "volume %s was staged on node %s; taking it over (its daemon gets fenced)",
                    volume_id,
                    other.node_id,
                )
            key_file = await asyncio.to_thread(
                keys.stage_key,
                state_dir,
                volume_id,
                keys.is_encrypted(record.parameters),
                dict(request.secrets),
            )
            spec = self._daemon_spec(volume_id, record, key_file)
            state_dir.mkdir(parents=True, exist_ok=True)
            self.registry.mark_staged(
                volume_id, StageRecord(self.node_id, str(spec.control_socket), staging)
            )
            (state_dir / "stage.json").write_text(json.dumps(wanted))
            was_staged = state is not None
            try:
                await self._supervise(volume_id, spec)
                if was_staged:  # its daemon may have died unwatched: start() cut it off
                    self._refuse_cut_off(volume_id)
                attachment = await att.attach(state_dir, spec.nbd_socket, spec.size_bytes)
                if block:
                    Path(staging).mkdir(parents=True, exist_ok=True)
                elif not is_mounted(staging):
                    found = await detect_fs(attachment.device)
                    if not found:
                        log.info("volume %s is blank: making %s", volume_id, fs_type)
                        await make_fs(attachment.device, fs_type)
                        found = fs_type
                    Path(staging).mkdir(parents=True, exist_ok=True)
                    flags = list(wanted["mount_flags"])
                    if found == "xfs":
                        # A volume made from a snapshot carries its source's UUID;
                        # XFS refuses to mount a duplicate without this.
                        flags.append("nouuid")
                    options = ["-o", ",".join(flags)] if flags else []
                    await run("mount", "-t", found, *options, attachment.device, staging)
            except BaseException:
                if not was_staged:  # leave nothing half-made behind for a retry
                    log.warning("staging volume %s failed; undoing it", volume_id)
                    with contextlib.suppress(Exception):
                        await self._teardown(volume_id, staging)
                raise
            log.info("staged volume %s at %s (%s)", volume_id, staging, attachment.device)
        return pb.NodeStageVolumeResponse()

    @rpc
    async def NodeUnstageVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        staging = e.require(request.staging_target_path, "staging_target_path")
        self.state_dir(volume_id)  # validates the id before anything is touched
        async with self.lock(volume_id):
            self._known_here(volume_id, staging)
            state = self._read_state(volume_id)
            if state is not None and state["staging_path"] != staging:
                # The spec: not staged at this path is OK, and its stage elsewhere
                # is none of this call's business.
                log.info(
                    "volume %s is staged at %s, not %s: nothing to unstage",
                    volume_id,
                    state["staging_path"],
                    staging,
                )
                return pb.NodeUnstageVolumeResponse()
            await self._teardown(volume_id, staging)
            log.info("unstaged volume %s", volume_id)
        return pb.NodeUnstageVolumeResponse()

    def _known_here(self, volume_id: str, path: str) -> None:
        """NOT_FOUND for a volume that does not exist and has nothing on this node.

        The spec's error for an unknown volume; a known one that is not staged or
        published (nothing to undo) is OK, as are leftovers of a vanished one."""
        if self._read_state(volume_id) is not None or is_mounted(path):
            return
        if self.registry.volume(volume_id) is None:
            raise e.not_found(f"volume {volume_id} does not exist")

    async def _teardown(self, volume_id: str, staging: str) -> None:
        """Unmount, detach, stop the daemon (its final flush), forget the stage."""
        state_dir = self.state_dir(volume_id)
        if is_mounted(staging):
            await run("sync", "-f", staging, check=False)
            await unmount(staging)
        await att.detach(state_dir)
        daemon = self.daemons.pop(volume_id, None)
        if daemon is None and await daemon_pid(state_dir / "control.sock") is not None:
            daemon = SupervisedDaemon(
                DaemonSpec(volume_id, self.registry.storage_url(volume_id), 0, 0, state_dir)
            )
            await daemon.start()  # adopts the running one
        if daemon is not None:
            await daemon.stop()
        staged = self.registry.staged(volume_id)
        if staged is not None and staged.node_id == self.node_id:
            self.registry.clear_staged(volume_id)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "stage.json").unlink()
        keys.forget_key(state_dir)
        for leftover in ("fuse", "control.sock", "nbd.sock", CONDITION_FILE):
            path = state_dir / leftover
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()

    # --- publish --------------------------------------------------------------

    @rpc
    async def NodePublishVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        target = e.require(request.target_path, "target_path")
        staging = request.staging_target_path
        if not staging:  # the spec's code for this one (we have STAGE_UNSTAGE_VOLUME)
            raise e.precondition("staging_target_path is required: stage the volume first")
        cap = check_node_capability(request)
        block = cap.WhichOneof("access_type") == "block"
        async with self.lock(volume_id):
            state = self._read_state(volume_id)
            if state is None and self.registry.volume(volume_id) is None:
                raise e.not_found(f"volume {volume_id} does not exist")
            if state is None or state["staging_path"] != staging:
                raise e.precondition(f"volume {volume_id} is not staged at {staging}")
            if state["block"] != block:
                raise e.precondition(
                    f"volume {volume_id} is staged as {describe(state)}: publish it as "
                    f"{'a block volume' if state['block'] else 'a filesystem'}"
                )
            self._refuse_cut_off(volume_id)
            current = mount_of(target)
            if current is not None:
                readonly = "ro" in current[1].split(",")
                published_block = stat.S_ISBLK(os.stat(target).st_mode)
                if readonly != request.readonly or published_block != block:
                    was = f"{'read-only' if readonly else 'read-write'} " + (
                        "as a block device" if published_block else "as a filesystem"
                    )
                    raise e.exists(f"{target} is already published {was}")
                return pb.NodePublishVolumeResponse()
            if block:
                attachment = await att.current_device(self.state_dir(volume_id))
                if attachment is None:
                    raise e.precondition(f"volume {volume_id} has no block device on this node")
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).touch()
                source = attachment.device
            else:
                if not is_mounted(staging):
                    raise e.precondition(f"volume {volume_id} is not mounted at {staging}")
                Path(target).mkdir(parents=True, exist_ok=True)
                source = staging
            await run("mount", "--bind", source, target)
            if request.readonly:
                await run("mount", "-o", "remount,bind,ro", target)
            log.info("published volume %s at %s%s", volume_id, target, " (ro)" * request.readonly)
        return pb.NodePublishVolumeResponse()

    @rpc
    async def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        target = e.require(request.target_path, "target_path")
        self.state_dir(volume_id)  # validates the id
        async with self.lock(volume_id):
            self._known_here(volume_id, target)
            await unmount(target)
            path = Path(target)
            with contextlib.suppress(FileNotFoundError):
                path.rmdir() if path.is_dir() else path.unlink()
            log.info("unpublished volume %s from %s", volume_id, target)
        return pb.NodeUnpublishVolumeResponse()

    # --- information and growth -----------------------------------------------

    @rpc
    async def NodeGetVolumeStats(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        path = e.require(request.volume_path, "volume_path")
        if not os.path.exists(path):
            raise e.not_found(f"volume path {path} does not exist")
        state = self._read_state(volume_id)
        attachment = await att.current_device(self.state_dir(volume_id))
        if state is None or attachment is None:
            raise e.not_found(f"volume {volume_id} is not staged on this node")
        if not self._serves(state, attachment.device, path):
            raise e.not_found(f"volume {volume_id} is not staged or published at {path}")
        # VOLUME_CONDITION: abnormal once its daemon died without flushing.
        abnormal, message = read_condition(self.state_dir(volume_id))
        condition = pb.VolumeCondition(abnormal=abnormal, message=message or "serving")
        if state["block"]:
            # A block volume's size is its device's: not that of the filesystem
            # holding the device node. The spec allows only BYTES here.
            size = await device_size(attachment.device)
            usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=size)]
            return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)
        st = os.statvfs(path)
        return pb.NodeGetVolumeStatsResponse(
            volume_condition=condition,
            usage=[
                pb.VolumeUsage(
                    unit=pb.VolumeUsage.BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                ),
                pb.VolumeUsage(
                    unit=pb.VolumeUsage.INODES,
                    total=st.f_files,
                    available=st.f_favail,
                    used=st.f_files - st.f_ffree,
                ),
            ],
        )

    @staticmethod
    def _serves(state: dict[str, Any], device: str, path: str) -> bool:
        """Is ``path`` this volume's staging path or one of its published targets?"""
        staging = state["staging_path"]
        if os.path.realpath(path) == os.path.realpath(staging):
            return True
        if not is_mounted(path):
            return False
        here = os.stat(path)
        if state["block"]:
            return stat.S_ISBLK(here.st_mode) and here.st_rdev == os.stat(device).st_rdev
        return is_mounted(staging) and here.st_dev == os.stat(staging).st_dev

    @rpc
    async def NodeExpandVolume(self, request: Any, context: Any) -> Any:
        volume_id = e.require(request.volume_id, "volume_id")
        volume_path = e.require(request.volume_path, "volume_path")
        state_dir = self.state_dir(volume_id)
        async with self.lock(volume_id):
            state = self._read_state(volume_id)
            attachment = await att.current_device(state_dir)
            if state is None or attachment is None:
                raise e.not_found(f"volume {volume_id} is not staged on this node")
            if not os.path.exists(volume_path):
                raise e.not_found(f"volume path {volume_path} does not exist")
            if not self._serves(state, attachment.device, volume_path):
                raise e.not_found(f"volume {volume_id} is not staged or published at {volume_path}")
            self._refuse_cut_off(volume_id)
            record = self.registry.volume(volume_id)
            if record is None:
                raise e.not_found(f"volume {volume_id} does not exist")
            wanted = request.capacity_range.required_bytes if request.capacity_range else 0
            if wanted > record.capacity_bytes:
                raise e.out_of_range(
                    f"volume {volume_id} is {record.capacity_bytes} bytes, less than the "
                    f"{wanted} asked for: ControllerExpandVolume grows it first"
                )
            size = await device_size(attachment.device)
            if size < record.capacity_bytes:
                size = await self._grow_device(volume_id, record, attachment)
            if not state["block"]:
                await grow_fs(attachment.device, state["staging_path"], state["fs_type"])
            log.info("expanded volume %s on this node to %d bytes", volume_id, size)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    async def _grow_device(
        self, volume_id: str, record: VolumeRecord, attachment: att.Attachment
    ) -> int:
        """Serve the recorded size while staged: restart the daemon with it (the
        proxy holds I/O meanwhile), then raise the loop device's limit."""
        if attachment.method != "nbdfuse":
            raise e.precondition(
                f"volume {volume_id} is attached with the kernel NBD client, which does not "
                "see a new size while attached: unstage and stage it again to grow it"
            )
        state_dir = self.state_dir(volume_id)
        if not att.has_proxy(state_dir):
            # nbdfuse straight on the daemon (staged by an older driver): a restart
            # would kill the mount, so grow it the offline way.
            raise e.precondition(
                f"volume {volume_id} was attached without the reconnecting proxy: "
                "unstage and stage it again to grow it"
            )
        spec = self._staged_spec(volume_id, record)
        daemon = await self._supervise(volume_id, spec)
        self._refuse_cut_off(volume_id)  # an adopted daemon may have died unwatched
        log.info("growing volume %s to %d bytes: restarting its daemon", volume_id, spec.size_bytes)
        await daemon.restart(spec)
        await att.grow(attachment, record.capacity_bytes)
        size = await device_size(attachment.device)
        if size < record.capacity_bytes:
            raise e.precondition(
                f"volume {volume_id}'s device stays at {size} bytes after its limit was "
                f"raised to {record.capacity_bytes}: unstage and stage it again to grow it"
            )
        return size

    @rpc
    async def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        kinds = (
            NodeRPC.STAGE_UNSTAGE_VOLUME,
            NodeRPC.GET_VOLUME_STATS,
            NodeRPC.EXPAND_VOLUME,
            NodeRPC.VOLUME_CONDITION,
        )
        caps = [pb.NodeServiceCapability(rpc=NodeRPC(type=k)) for k in kinds]
        return pb.NodeGetCapabilitiesResponse(capabilities=caps)

    @rpc
    async def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node_id)

    async def close(self) -> None:
        """Stop supervising; the daemons keep serving their mounted volumes."""
        for daemon in self.daemons.values():
            daemon._stopping = True
            if daemon._monitor is not None:
                daemon._monitor.cancel()
        self.daemons.clear()


def have_tools() -> list[str]:
    """Tools the node service needs that this machine lacks."""
    tools = (
        "mount",
        "umount",
        "blkid",
        "blockdev",
        "losetup",
        "nbdfuse",
        "nbdkit",
        "fusermount3",
    )
    return [t for t in tools if shutil.which(t) is None]
