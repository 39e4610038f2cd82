"""Node staging for real: portalbd daemons, nbdfuse, loop devices, mkfs, mounts.

Needs root, /dev/fuse, nbdfuse and losetup (what the machines have; the
kernel NBD client is not loaded here). Every test runs its own driver under
its own temporary directory, and cleanup removes whatever is left there
(mounts, loop devices, processes) even when a step failed.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from portalbd.control.async_client import request_once
from portalbd.control.errors import ControlError
from portalbd.csi.mounts import mounts
from portalbd.csi.proto import csi_pb2 as pb
from tests.support.csi import (
    MODE,
    Driver,
    block_cap,
    mount_cap,
    rpc_error,
    running_driver,
    start_driver,
    stop_driver,
)
from tests.support.leaks import leaked_runs

MIB = 1 << 20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="staging mounts filesystems: needs root"),
    pytest.mark.skipif(
        not Path("/dev/fuse").exists() or shutil.which("nbdfuse") is None,
        reason="needs /dev/fuse and nbdfuse",
    ),
]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    # The whole tmp_path: staging and target paths live there too, so cleanup
    # after a failure finds their mounts.
    with running_driver(tmp_path) as running:
        yield running


def new_volume(driver: Driver, name: str, size: int, fs_type: str = "ext4") -> str:
    volume = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap()],
            parameters={"fsType": fs_type},
        )
    ).volume
    volume_id: str = volume.volume_id
    return volume_id


def stage(driver: Driver, vid: str, staging: Path, cap: pb.VolumeCapability | None = None) -> None:
    driver.node.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=cap or mount_cap()
        )
    )


def unstage(driver: Driver, vid: str, staging: Path) -> None:
    driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    )


def publish_request(
    vid: str,
    staging: Path,
    target: Path,
    readonly: bool = False,
    cap: pb.VolumeCapability | None = None,
) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=cap or mount_cap(),
        readonly=readonly,
    )


def publish(
    driver: Driver,
    vid: str,
    staging: Path,
    target: Path,
    readonly: bool = False,
    cap: pb.VolumeCapability | None = None,
) -> None:
    driver.node.NodePublishVolume(publish_request(vid, staging, target, readonly, cap))


def unpublish(driver: Driver, vid: str, target: Path) -> None:
    driver.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )


def daemon_pids(vid: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"portalbd.daemon" in cmdline and vid.encode() in cmdline:
                pids.append(int(entry))
    return pids


def kill_daemon(vid: str, signum: int = signal.SIGKILL) -> int:
    (pid,) = daemon_pids(vid)
    os.kill(pid, signum)
    return pid


def wait_restarted(driver: Driver, vid: str, old: int) -> None:
    """Until the supervisor's new daemon for the volume answers on its socket."""
    socket = driver.state / vid / "control.sock"
    deadline = time.monotonic() + 60
    new: list[int] = []
    while time.monotonic() < deadline:
        new = [p for p in daemon_pids(vid) if p != old]
        if new and socket.exists():
            break
        time.sleep(0.1)
    assert new, driver.log()[-3000:]
    status = asyncio.run(_status(socket))
    assert status.get("Status", {}).get("pid") == new[0], status


def fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def test_stage_publish_unstage_restage_keeps_files(driver: Driver, tmp_path: Path) -> None:
    vid = new_volume(driver, "data", 64 * MIB)
    staging, target, ro_target = tmp_path / "staging", tmp_path / "pod/vol", tmp_path / "pod/ro"
    stage(driver, vid, staging)
    stage(driver, vid, staging)  # idempotent
    error = rpc_error(
        driver.node.NodeStageVolume,
        pb.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=str(tmp_path / "elsewhere"),
            volume_capability=mount_cap(),
        ),
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already staged at" in (error.details() or "")
    record = (driver.state / vid / "stage.json").read_text()
    for other, what in (
        (mount_cap("xfs"), "as ext4 mode SINGLE_NODE_WRITER, not xfs mode SINGLE_NODE_WRITER"),
        (block_cap(), "not a block volume"),
        (mount_cap(mode=MODE.SINGLE_NODE_READER_ONLY), "not ext4 mode SINGLE_NODE_READER_ONLY"),
    ):
        error = rpc_error(
            driver.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging), volume_capability=other
            ),
        )
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert f"volume {vid} is already staged at {staging} " in (error.details() or "")
        assert what in (error.details() or ""), error.details()
    assert (driver.state / vid / "stage.json").read_text() == record  # left untouched
    unstage(driver, vid, tmp_path / "elsewhere")  # not staged there: OK, and nothing undone
    assert (driver.state / vid / "stage.json").read_text() == record
    assert len(daemon_pids(vid)) == 1
    publish(driver, vid, staging, target)
    publish(driver, vid, staging, target)  # idempotent
    publish(driver, vid, staging, ro_target, readonly=True)
    error = rpc_error(
        driver.node.NodePublishVolume, publish_request(vid, staging, target, readonly=True)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"{target} is already published read-write as a filesystem" in (error.details() or "")
    error = rpc_error(
        driver.node.NodePublishVolume,
        publish_request(vid, staging, tmp_path / "pod/raw", cap=block_cap()),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is staged as ext4 mode SINGLE_NODE_WRITER: publish it as a filesystem" in (
        error.details() or ""
    )

    payload = os.urandom(3 * MIB)
    (target / "blob").write_bytes(payload)
    (target / "dir").mkdir()
    (target / "dir/note.txt").write_text("portalbd")
    assert (ro_target / "dir/note.txt").read_text() == "portalbd"
    with pytest.raises(OSError) as exc:
        (ro_target / "nope").write_text("x")
    assert exc.value.errno == errno.EROFS

    stats = driver.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target))
    )
    byte_usage = next(u for u in stats.usage if u.unit == pb.VolumeUsage.BYTES)
    assert byte_usage.used >= 3 * MIB and 50 * MIB < byte_usage.total <= 64 * MIB
    error = rpc_error(  # a path that exists but does not hold the volume
        driver.node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(tmp_path / "pod")),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"volume {vid} is not staged or published at {tmp_path / 'pod'}" in (
        error.details() or ""
    )

    error = rpc_error(driver.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is staged on node test-node" in (error.details() or "")

    # The daemon dies under the mounted filesystem: the supervisor restarts it,
    # the proxy reconnects, and the pod's mount carries on (what was synced
    # before is there; writing goes on).
    old = kill_daemon(vid, signal.SIGTERM)
    wait_restarted(driver, vid, old)
    assert "restarting (restart 1, exit code 0: it flushed everything)" in driver.log()
    stats = driver.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target))
    )
    assert not stats.volume_condition.abnormal  # it flushed before it went
    assert (target / "blob").read_bytes() == payload
    (target / "after-restart.txt").write_text("written to the restarted daemon")
    os.sync()
    assert (ro_target / "after-restart.txt").read_text() == "written to the restarted daemon"

    for path in (target, ro_target):
        unpublish(driver, vid, path)
        unpublish(driver, vid, path)  # idempotent
        assert not path.exists()
    unstage(driver, vid, staging)
    unstage(driver, vid, staging)  # idempotent
    assert daemon_pids(vid) == []

    stage(driver, vid, staging)
    publish(driver, vid, staging, target)
    assert (target / "blob").read_bytes() == payload
    assert (target / "dir/note.txt").read_text() == "portalbd"
    assert (target / "after-restart.txt").read_text() == "written to the restarted daemon"
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_failed_stage_leaves_nothing_behind(driver: Driver, tmp_path: Path) -> None:
    vid = new_volume(driver, "unlucky", 16 * MIB)
    staging = tmp_path / "not-a-directory"
    staging.write_text("a file where the mount point should be")
    error = rpc_error(
        driver.node.NodeStageVolume,
        pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=mount_cap()
        ),
    )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert f"File exists: '{staging}'" in (error.details() or "")
    assert daemon_pids(vid) == []
    assert not (driver.state / vid / "stage.json").exists()
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))  # not staged any more


def test_snapshot_clone_and_offline_expand(driver: Driver, tmp_path: Path) -> None:
    vid = new_volume(driver, "source", 320 * MIB, fs_type="xfs")  # xfs wants >= 300 MiB
    staging = tmp_path / "staging"
    stage(driver, vid, staging)
    (staging / "before.txt").write_text("in the snapshot")
    # Online: through the serving daemon, with the filesystem frozen around it.
    snapshot = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=vid, name="snap")
    ).snapshot
    (staging / "after.txt").write_text("not in the snapshot")

    clone = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="clone",
            volume_capabilities=[mount_cap()],
            volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
            ),
        )
    ).volume
    clone_staging = tmp_path / "clone-staging"
    stage(driver, clone.volume_id, clone_staging)
    assert (clone_staging / "before.txt").read_text() == "in the snapshot"
    assert not (clone_staging / "after.txt").exists()
    (clone_staging / "clone-only.txt").write_text("x")
    unstage(driver, clone.volume_id, clone_staging)
    assert (staging / "after.txt").exists() and not (staging / "clone-only.txt").exists()
    # Deleting a snapshot of a served volume goes through its daemon too.
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    status = asyncio.run(_status(driver.state / vid / "control.sock"))
    assert status["Status"]["snapshot_count"] == 0
    unstage(driver, vid, staging)

    # Offline expansion: the controller records the size, the next stage serves
    # it, and NodeExpandVolume grows the filesystem.
    before = 0
    stage(driver, vid, staging)
    before = fs_size(staging)
    unstage(driver, vid, staging)
    grown = driver.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=512 * MIB)
        )
    )
    assert grown.capacity_bytes == 512 * MIB and grown.node_expansion_required
    stage(driver, vid, staging)
    response = driver.node.NodeExpandVolume(
        pb.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=str(staging),
            staging_target_path=str(staging),
            capacity_range=pb.CapacityRange(required_bytes=512 * MIB),
        )
    )
    assert response.capacity_bytes == 512 * MIB
    after = fs_size(staging)
    assert after > before + 150 * MIB
    assert (staging / "before.txt").read_text() == "in the snapshot"

    # Online: grown while a pod has it published and writes to it.
    target = tmp_path / "pod/vol"
    publish(driver, vid, staging, target)
    (target / "online.bin").write_bytes(payload := os.urandom(2 * MIB))
    grown = driver.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=640 * MIB)
        )
    )
    assert grown.capacity_bytes == 640 * MIB and grown.node_expansion_required
    response = driver.node.NodeExpandVolume(
        pb.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=str(target),
            staging_target_path=str(staging),
            capacity_range=pb.CapacityRange(required_bytes=640 * MIB),
        )
    )
    assert response.capacity_bytes == 640 * MIB
    assert fs_size(target) > after + 100 * MIB
    assert (target / "online.bin").read_bytes() == payload
    (target / "grown.txt").write_text("after the online growth")
    stats = driver.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target))
    )
    assert next(u.total for u in stats.usage if u.unit == pb.VolumeUsage.BYTES) > after + 100 * MIB
    error = rpc_error(
        driver.node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=str(staging),
            capacity_range=pb.CapacityRange(required_bytes=1024 * MIB),
        ),
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    error2 = rpc_error(
        driver.node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=str(tmp_path / "pod")),
    )
    assert error2.code() == grpc.StatusCode.NOT_FOUND
    assert f"volume {vid} is not staged or published at {tmp_path / 'pod'}" in (
        error2.details() or ""
    )
    assert (
        f"volume {vid} is {640 * MIB} bytes, less than the {1024 * MIB} asked for: "
        "ControllerExpandVolume grows it first"
    ) in (error.details() or "")
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    stage(driver, vid, staging)  # the new size is the volume's for good
    assert (staging / "grown.txt").read_text() == "after the online growth"
    unstage(driver, vid, staging)

    # Snapshot while unstaged: taken offline, straight from storage.
    offline = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=vid, name="snap-offline")
    ).snapshot
    assert offline.size_bytes == 640 * MIB
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=offline.snapshot_id))
    for volume_id in (clone.volume_id, vid):
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert not any((driver.base / "root/volumes").iterdir())


def test_block_volume_and_daemon_restart(driver: Driver, tmp_path: Path) -> None:
    vid = new_volume(driver, "raw", 16 * MIB)
    staging, target = tmp_path / "staging", tmp_path / "pod/dev"
    stage(driver, vid, staging, block_cap())
    publish(driver, vid, staging, target, cap=block_cap())
    publish(driver, vid, staging, target, cap=block_cap())
    error = rpc_error(
        driver.node.NodePublishVolume,
        publish_request(vid, staging, target, readonly=True, cap=block_cap()),
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"{target} is already published read-write as a block device" in (error.details() or "")
    # The volume's size, not that of the filesystem holding the device node;
    # bytes only (the spec allows no inodes for a block volume).
    for path in (target, staging):
        stats = driver.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path))
        )
        assert [(u.unit, u.total) for u in stats.usage] == [(pb.VolumeUsage.BYTES, 16 * MIB)]
    error = rpc_error(
        driver.node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(tmp_path)),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"is not staged or published at {tmp_path}" in (error.details() or "")
    data = os.urandom(MIB)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, data, 4 * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)

    stage(driver, vid, staging, block_cap())
    publish(driver, vid, staging, target, cap=block_cap())
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.pread(fd, MIB, 4 * MIB) == data
    finally:
        os.close(fd)

    # The supervisor restarts a daemon that exits (cleanly: it flushed); the
    # device keeps working.
    old = kill_daemon(vid, signal.SIGTERM)
    wait_restarted(driver, vid, old)
    assert "exited unexpectedly; restarting" in driver.log()
    stats = driver.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target))
    )
    assert not stats.volume_condition.abnormal
    assert stats.volume_condition.message == "serving"
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.pread(fd, MIB, 4 * MIB) == data
        os.pwrite(fd, data, 8 * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    assert daemon_pids(vid) == []


KILLED = (
    "the volume's daemon was killed by signal 9: writes since the last flush are lost; "
    "the device is cut off (its I/O fails): unstage and stage the volume again"
)
UNKNOWN = (
    "the volume's daemon ended (exit status unknown): writes since the last flush may be "
    "lost; the device is cut off (its I/O fails): unstage and stage the volume again"
)


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path: Path, offset: int = 0) -> bytes:
    """Read past the page cache: from the device itself."""
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf)


def wait_cut_off(driver: Driver, vid: str, path: Path) -> pb.VolumeCondition:
    """The volume's condition once its device is cut off (the condition is
    recorded first, then the proxy and nbdfuse die, then the log says so)."""
    deadline = time.monotonic() + 30
    while f"cut off volume {vid}: " not in driver.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = driver.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path))
    )
    condition: pb.VolumeCondition = stats.volume_condition
    return condition


def assert_dead(read: Path, write: Path) -> None:
    """Every I/O fails: the disk is gone (not one that silently lost its cache)."""
    with pytest.raises(OSError) as exc:
        read_direct(read)
    assert exc.value.errno == errno.EIO, exc.value
    with pytest.raises(OSError) as exc:
        write_synced(write, b"x" * 4096)
    assert exc.value.errno in (errno.EIO, errno.EROFS), exc.value


def current_loop(driver: Driver, vid: str) -> str:
    """The loop device over the volume's nbdfuse file."""
    disk = str(driver.state / vid / "fuse/disk")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip() == disk:
            return f"/dev/{backing.parent.parent.name}"
    raise AssertionError(f"no loop device over {disk}")


def assert_nothing_left(driver: Driver, vid: str) -> None:
    state = driver.state / vid
    assert daemon_pids(vid) == []
    assert not any(p.startswith(str(state)) for p, _, _ in mounts())
    loops = Path("/sys/block").glob("loop*/loop/backing_file")
    assert not [b for b in loops if b.read_text().startswith(str(state))]
    assert not (state / "condition.json").exists()  # a new stage starts clean


def test_killed_daemon_cuts_the_mount_off_until_restaged(driver: Driver, tmp_path: Path) -> None:
    """SIGKILL loses the writes answered since the last flush: the mount must
    not carry on over them through a restarted daemon. Its device dies
    instead, the RPCs that would use it say why, and a restage brings back
    what was flushed, on a filesystem fsck finds clean."""
    vid = new_volume(driver, "killed", 32 * MIB)
    staging, target = tmp_path / "staging", tmp_path / "pod/vol"
    stage(driver, vid, staging)
    publish(driver, vid, staging, target)
    flushed = os.urandom(MIB)
    write_synced(target / "flushed.bin", flushed)
    (target / "unflushed.txt").write_text("maybe lost")
    assert read_direct(target / "flushed.bin") == flushed[:4096]

    old = kill_daemon(vid)
    condition = wait_cut_off(driver, vid, target)
    assert condition.abnormal and condition.message == KILLED
    wait_restarted(driver, vid, old)  # the daemon is back; the mount stays dead
    assert_dead(target / "flushed.bin", target / "after-the-kill")
    assert_dead(staging / "flushed.bin", staging / "after-the-kill-too")
    assert wait_cut_off(driver, vid, staging).message == KILLED

    refused = f"volume {vid}: {KILLED}"
    for call, request in (
        (driver.node.NodePublishVolume, publish_request(vid, staging, target)),
        (driver.node.NodePublishVolume, publish_request(vid, staging, tmp_path / "pod/other")),
        (
            driver.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging), volume_capability=mount_cap()
            ),
        ),
        (
            driver.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=str(target)),
        ),
    ):
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        assert error.details() == refused
    assert not (tmp_path / "pod/other").exists()
    # nor is a dead filesystem snapshotted (its freeze would fail with EIO)
    error = rpc_error(
        driver.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(source_volume_id=vid, name="of-the-dead"),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert error.details() == refused
    assert not driver.controller.ListSnapshots(
        pb.ListSnapshotsRequest(source_volume_id=vid)
    ).entries

    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    assert_nothing_left(driver, vid)

    stage(driver, vid, staging)
    publish(driver, vid, staging, target)
    assert (target / "flushed.bin").read_bytes() == flushed
    write_synced(target / "after-restage.txt", b"the device works again")
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    # What the kill left, replayed by the mount above: a clean filesystem.
    raw = tmp_path / "raw"
    stage(driver, vid, raw, block_cap())
    device = current_loop(driver, vid)
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    unstage(driver, vid, raw)
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_a_new_driver_cuts_off_a_volume_whose_daemon_died_unwatched(
    driver: Driver, tmp_path: Path
) -> None:
    """A driver learns from the state directory alone, and an adopted daemon is
    not its child: whatever ended it, the exit status is unknown, so unclean."""
    vid = new_volume(driver, "unwatched", 16 * MIB)
    staging, target = tmp_path / "staging", tmp_path / "pod/dev"
    stage(driver, vid, staging, block_cap())
    publish(driver, vid, staging, target, cap=block_cap())
    data = os.urandom(4096)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)

    # Killed while no driver runs: the next one notices as it starts.
    stop_driver(driver)
    kill_daemon(vid)
    root = f"file://{driver.base}/root"  # the same volumes and state; a log of its own
    second = start_driver(driver.base / "second", state=driver.state, root=root)
    try:
        condition = wait_cut_off(second, vid, target)
        assert condition.abnormal and condition.message == UNKNOWN
        assert "is gone (died unwatched)" in second.log()
        assert_dead(target, target)
        error = rpc_error(
            second.node.NodePublishVolume,
            publish_request(vid, staging, tmp_path / "pod/other", cap=block_cap()),
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == f"volume {vid}: {UNKNOWN}"
        unpublish(second, vid, target)
        unstage(second, vid, staging)
        assert_nothing_left(second, vid)
        stage(second, vid, staging, block_cap())
        publish(second, vid, staging, target, cap=block_cap())
        assert read_direct(target) == data
    finally:
        stop_driver(second)

    # Adopted alive by the next driver, then killed: noticed as it goes.
    third = start_driver(driver.base / "third", state=driver.state, root=root)
    try:
        deadline = time.monotonic() + 30
        while "adopting running daemon" not in third.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_daemon(vid)
        condition = wait_cut_off(third, vid, target)
        assert condition.abnormal and condition.message == UNKNOWN
        assert_dead(target, target)
        unpublish(third, vid, target)
        unstage(third, vid, staging)
        assert_nothing_left(third, vid)
    finally:
        stop_driver(third)


def test_encrypted_block_volume_takes_its_key_from_the_stage_secret(
    driver: Driver, tmp_path: Path
) -> None:
    """The key reaches the daemon through a file only it can read, gone after
    unstaging; the storage holds none of the data; another key is refused.
    (The right key after a restart: tests/integration/test_encryption.py.)"""
    volume = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="sealed",
            capacity_range=pb.CapacityRange(required_bytes=16 * MIB),
            volume_capabilities=[block_cap()],
            parameters={"encrypted": "true"},
        )
    ).volume
    vid = volume.volume_id
    staging, target = tmp_path / "staging", tmp_path / "pod/dev"
    key = {"encryptionKey": os.urandom(32).hex()}

    def stage_with(secrets: dict[str, str]) -> None:
        driver.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                volume_capability=block_cap(),
                secrets=secrets,
            )
        )

    stage_with(key)
    key_file = driver.state / vid / "encryption.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    publish(driver, vid, staging, target, cap=block_cap())
    data = os.urandom(MIB)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, data, 2 * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    # A daemon that dies is restarted with the same key file.
    (old,) = daemon_pids(vid)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [p for p in daemon_pids(vid) if p != old]:
        time.sleep(0.1)
    status: dict[str, Any] = asyncio.run(_status(driver.state / vid / "control.sock"))
    assert status["Status"]["encryption"] == "aes-256-gcm", status
    unpublish(driver, vid, target)
    unstage(driver, vid, staging)
    assert not key_file.exists()
    assert leaked_runs(data, driver.base / "root" / "volumes" / vid) == []

    error = rpc_error(
        driver.node.NodeStageVolume,
        pb.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=str(staging),
            volume_capability=block_cap(),
            secrets={"encryptionKey": os.urandom(32).hex()},
        ),
    )
    assert "the encryption key does not match this disk" in (error.details() or "")
    assert not key_file.exists()  # the failed stage was undone


async def _status(socket: Path) -> dict[str, dict[str, int]]:
    """Status once the daemon has opened its storage (it answers errors before)."""
    reply: dict[str, dict[str, int]] = {}
    for _ in range(300):
        try:
            reply = await request_once(socket, "Status", timeout=5)
        except ControlError:
            reply = {}
        if "Status" in reply:
            return reply
        await asyncio.sleep(0.1)
    raise AssertionError(f"daemon never reported its status: {reply}")
