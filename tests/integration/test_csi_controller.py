"""The CSI gRPC surface, checked the way csi-sanity checks a driver.

One driver (controller and node services) runs for the module on a local
root; every RPC is called for success, for idempotency, and for each error
code the spec prescribes, with the message a user would see.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from portalbd.csi.controller import choose_capacity, round_up
from portalbd.csi.errors import CsiError
from portalbd.csi.proto import csi_pb2 as pb
from tests.support import BIN
from tests.support.csi import MODE, Driver, block_cap, mount_cap, rpc_error, running_driver

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 64 * 1024
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    with running_driver(tmp_path_factory.mktemp("csi")) as running:
        yield running


def create(
    driver: Driver, name: str, required: int = 16 * MIB, limit: int = 0, **kwargs: object
) -> pb.Volume:
    request = pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=[mount_cap()],
        **kwargs,  # type: ignore[arg-type]
    )
    volume: pb.Volume = driver.controller.CreateVolume(request).volume
    return volume


def from_snapshot(snapshot_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
    )


def expect(code: grpc.StatusCode, text: str, call: object, request: object) -> None:
    error = rpc_error(call, request)
    assert error.code() == code, error.details()
    assert text in (error.details() or ""), error.details()


# --- pure capacity arithmetic ---------------------------------------------------


def test_capacity_is_rounded_up_never_down() -> None:
    assert choose_capacity(pb.CapacityRange(required_bytes=1), BLOCK) == BLOCK
    assert choose_capacity(pb.CapacityRange(required_bytes=BLOCK + 1), BLOCK) == 2 * BLOCK
    assert choose_capacity(pb.CapacityRange(required_bytes=2 * BLOCK), BLOCK) == 2 * BLOCK
    assert choose_capacity(None, BLOCK) == GIB
    limited = pb.CapacityRange(limit_bytes=10 * BLOCK + 5)
    assert choose_capacity(limited, BLOCK) == 10 * BLOCK
    with pytest.raises(CsiError) as exc:
        choose_capacity(pb.CapacityRange(required_bytes=BLOCK + 1, limit_bytes=BLOCK + 100), BLOCK)
    assert exc.value.code == Code.OUT_OF_RANGE
    assert "rounded up to whole 65536-byte blocks is 131072" in exc.value.message
    assert round_up(0, BLOCK) == 0


# --- identity --------------------------------------------------------------------


def test_identity(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "portalbd.csi.kyro.dev" and info.vendor_version
    caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert pb.PluginCapability.Service.CONTROLLER_SERVICE in services
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]
    assert driver.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_controller_capabilities(driver: Driver) -> None:
    response = driver.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    kinds = {c.rpc.type for c in response.capabilities}
    rpc = pb.ControllerServiceCapability.RPC
    assert kinds == {
        rpc.CREATE_DELETE_VOLUME,
        rpc.LIST_VOLUMES,
        rpc.GET_CAPACITY,
        rpc.CREATE_DELETE_SNAPSHOT,
        rpc.LIST_SNAPSHOTS,
        rpc.EXPAND_VOLUME,
    }


# --- CreateVolume / DeleteVolume -------------------------------------------------------


def test_create_volume_rounds_up_and_is_idempotent(driver: Driver) -> None:
    volume = create(driver, "round", required=100_000_001)
    assert volume.capacity_bytes == round_up(100_000_001, BLOCK)
    assert volume.capacity_bytes % BLOCK == 0 and volume.capacity_bytes >= 100_000_001
    assert volume.volume_context["fsType"] == "ext4"
    again = create(driver, "round", required=100_000_001)
    assert again.volume_id == volume.volume_id
    assert again.capacity_bytes == volume.capacity_bytes
    expect(
        Code.ALREADY_EXISTS,
        "with different size, source or parameters",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="round",
            capacity_range=pb.CapacityRange(required_bytes=GIB),
            volume_capabilities=[mount_cap()],
        ),
    )


def test_create_volume_defaults_and_limits(driver: Driver) -> None:
    request = pb.CreateVolumeRequest(name="default-size", volume_capabilities=[mount_cap()])
    assert driver.controller.CreateVolume(request).volume.capacity_bytes == GIB
    limited = create(driver, "limited", required=0, limit=5 * MIB + 7)
    assert limited.capacity_bytes == 5 * MIB
    expect(
        Code.OUT_OF_RANGE,
        "more than limit_bytes",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="too-tight",
            capacity_range=pb.CapacityRange(required_bytes=BLOCK + 1, limit_bytes=BLOCK + 10),
            volume_capabilities=[block_cap()],  # no filesystem minimum in the way
        ),
    )
    expect(
        Code.OUT_OF_RANGE,
        "is more than limit_bytes",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="inverted",
            capacity_range=pb.CapacityRange(required_bytes=2 * MIB, limit_bytes=MIB),
            volume_capabilities=[mount_cap()],
        ),
    )
    expect(
        Code.OUT_OF_RANGE,
        "largest volume",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="huge",
            capacity_range=pb.CapacityRange(required_bytes=1 << 50),
            volume_capabilities=[mount_cap()],
        ),
    )


def test_create_volume_argument_errors(driver: Driver) -> None:
    create_volume = driver.controller.CreateVolume
    caps = [mount_cap()]
    expect(
        Code.INVALID_ARGUMENT,
        "name is required",
        create_volume,
        pb.CreateVolumeRequest(volume_capabilities=caps),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "volume capabilities are required",
        create_volume,
        pb.CreateVolumeRequest(name="x"),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "MULTI_NODE_MULTI_WRITER is not supported",
        create_volume,
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=[mount_cap(mode=MODE.MULTI_NODE_MULTI_WRITER)]
        ),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "filesystem 'btrfs' is not supported",
        create_volume,
        pb.CreateVolumeRequest(name="x", volume_capabilities=[mount_cap("btrfs")]),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "unknown parameter 'color'",
        create_volume,
        pb.CreateVolumeRequest(name="x", volume_capabilities=caps, parameters={"color": "red"}),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "parameter fsType='ntfs'",
        create_volume,
        pb.CreateVolumeRequest(name="x", volume_capabilities=caps, parameters={"fsType": "ntfs"}),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "parameter blockSize=3000",
        create_volume,
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=caps, parameters={"blockSize": "3000"}
        ),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "must not be negative",
        create_volume,
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=caps, capacity_range=pb.CapacityRange(required_bytes=-1)
        ),
    )
    expect(
        Code.NOT_FOUND,
        "snapshot 'pbs-nope' does not exist",
        create_volume,
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=caps, volume_content_source=from_snapshot("pbs-nope")
        ),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "cloning a volume directly is not supported",
        create_volume,
        pb.CreateVolumeRequest(
            name="x",
            volume_capabilities=caps,
            volume_content_source=pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id="v")
            ),
        ),
    )


def test_parameters_choose_filesystem_and_block_size(driver: Driver) -> None:
    volume = create(
        driver,
        "xfs-4k",
        required=300 * MIB + 5000,  # xfs needs 300 MiB
        parameters={"fsType": "xfs", "blockSize": "4096", "csi.storage.k8s.io/pvc/name": "p"},
    )
    assert volume.capacity_bytes == 300 * MIB + 8192
    assert volume.volume_context["fsType"] == "xfs"
    assert volume.volume_context["blockSize"] == "4096"


def test_delete_volume(driver: Driver) -> None:
    volume = create(driver, "doomed")
    expect(
        Code.INVALID_ARGUMENT,
        "volume_id is required",
        driver.controller.DeleteVolume,
        pb.DeleteVolumeRequest(),
    )
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="pbd-never-existed"))
    assert not (driver.base / "root/volumes" / volume.volume_id).exists()
    reborn = create(driver, "doomed")
    assert reborn.volume_id != volume.volume_id


# --- Validate / List / GetCapacity -------------------------------------------------------


def test_validate_volume_capabilities(driver: Driver) -> None:
    volume = create(driver, "validate")
    validate = driver.controller.ValidateVolumeCapabilities
    ok = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_cap("xfs"), block_cap()]
        )
    )
    assert len(ok.confirmed.volume_capabilities) == 2
    refused = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_cap(mode=MODE.MULTI_NODE_READER_ONLY)],
        )
    )
    assert not refused.HasField("confirmed")
    assert "single node only" in refused.message
    context = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_cap()],
            volume_context={"fsType": "xfs", "blockSize": "65536"},
        )
    )
    assert not context.HasField("confirmed")
    assert context.message == "volume_context does not match the volume's (fsType='ext4')"
    params = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_cap()], parameters={"x": "1"}
        )
    )
    assert not params.HasField("confirmed")
    assert "unknown parameter 'x'" in params.message
    same = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_cap()],
            volume_context=dict(volume.volume_context),
        )
    )
    assert same.confirmed.volume_context == volume.volume_context
    expect(
        Code.INVALID_ARGUMENT,
        "volume_id is required",
        validate,
        pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "volume capabilities are required",
        validate,
        pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id),
    )
    expect(
        Code.NOT_FOUND,
        "does not exist",
        validate,
        pb.ValidateVolumeCapabilitiesRequest(volume_id="pbd-x", volume_capabilities=[mount_cap()]),
    )


def test_list_volumes_pages_through_everything(driver: Driver) -> None:
    for i in range(3):
        create(driver, f"list-{i}")
    everything = driver.controller.ListVolumes(pb.ListVolumesRequest())
    assert not everything.next_token
    all_ids = [e.volume.volume_id for e in everything.entries]
    seen: list[str] = []
    token = ""
    while True:
        page = driver.controller.ListVolumes(
            pb.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == all_ids and len(set(seen)) == len(seen) >= 3
    expect(
        Code.ABORTED,
        "invalid starting_token",
        driver.controller.ListVolumes,
        pb.ListVolumesRequest(starting_token="banana"),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "max_entries",
        driver.controller.ListVolumes,
        pb.ListVolumesRequest(max_entries=-1),
    )


def test_get_capacity(driver: Driver) -> None:
    response = driver.controller.GetCapacity(
        pb.GetCapacityRequest(volume_capabilities=[mount_cap()])
    )
    assert response.available_capacity > 0
    assert response.maximum_volume_size.value == 1 << 44
    refused = driver.controller.GetCapacity(
        pb.GetCapacityRequest(volume_capabilities=[mount_cap(mode=MODE.MULTI_NODE_MULTI_WRITER)])
    )
    assert refused.available_capacity == 0
    xfs = driver.controller.GetCapacity(
        pb.GetCapacityRequest(volume_capabilities=[mount_cap("xfs")])
    )
    assert xfs.minimum_volume_size.value == 300 * MIB
    raw = driver.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[block_cap()]))
    assert raw.minimum_volume_size.value == 4096


def test_create_volume_raises_a_size_to_its_filesystems_minimum(driver: Driver) -> None:
    """mkfs refuses a device too small (xfs: 300 MiB; ext4: no journal under
    2 MiB, fails under 256 KiB): such a volume would fail every stage."""
    assert (
        create(driver, "tiny-xfs", required=16 * MIB, parameters={"fsType": "xfs"}).capacity_bytes
        == 300 * MIB
    )
    assert create(driver, "tiny-ext4", required=64 * 1024).capacity_bytes == 2 * MIB
    raw = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="tiny-raw",
            capacity_range=pb.CapacityRange(required_bytes=64 * 1024),
            volume_capabilities=[block_cap()],
        )
    ).volume
    assert raw.capacity_bytes == 64 * 1024  # a raw block volume has no filesystem to fit
    expect(
        Code.OUT_OF_RANGE,
        f"limit_bytes {100 * MIB} is below the smallest possible volume "
        f"({300 * MIB} bytes: the smallest xfs filesystem)",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="capped-xfs",
            capacity_range=pb.CapacityRange(required_bytes=16 * MIB, limit_bytes=100 * MIB),
            volume_capabilities=[mount_cap("xfs")],
        ),
    )


# --- expansion ---------------------------------------------------------------------------


def test_controller_expand_volume(driver: Driver) -> None:
    volume = create(driver, "grow", required=8 * MIB)
    expand = driver.controller.ControllerExpandVolume
    grown = expand(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=20 * MIB + 1)
        )
    )
    assert grown.capacity_bytes == round_up(20 * MIB + 1, BLOCK)
    assert grown.node_expansion_required
    same = expand(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=MIB)
        )
    )
    assert same.capacity_bytes == grown.capacity_bytes
    listed = {
        e.volume.volume_id: e.volume
        for e in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
    }
    assert listed[volume.volume_id].capacity_bytes == grown.capacity_bytes
    expect(
        Code.INVALID_ARGUMENT,
        "volume_id is required",
        expand,
        pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=1)),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "capacity_range is required",
        expand,
        pb.ControllerExpandVolumeRequest(volume_id=volume.volume_id),
    )
    expect(
        Code.NOT_FOUND,
        "does not exist",
        expand,
        pb.ControllerExpandVolumeRequest(
            volume_id="pbd-x", capacity_range=pb.CapacityRange(required_bytes=1)
        ),
    )
    expect(
        Code.OUT_OF_RANGE,
        f"is already {grown.capacity_bytes} bytes, more than limit_bytes {8 * MIB} "
        "(volumes never shrink)",
        expand,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=pb.CapacityRange(required_bytes=MIB, limit_bytes=8 * MIB),
        ),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "access mode MULTI_NODE_MULTI_WRITER is not supported",
        expand,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=pb.CapacityRange(required_bytes=1),
            volume_capability=mount_cap(mode=MODE.MULTI_NODE_MULTI_WRITER),
        ),
    )
    expect(
        Code.OUT_OF_RANGE,
        "more than limit_bytes",
        expand,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=pb.CapacityRange(required_bytes=40 * MIB + 1, limit_bytes=40 * MIB + 2),
        ),
    )


# --- snapshots ----------------------------------------------------------------------------


def test_snapshots_offline_lifecycle(driver: Driver) -> None:
    source = create(driver, "snap-source", required=4 * MIB)
    other = create(driver, "snap-other", required=4 * MIB)
    snap_req = pb.CreateSnapshotRequest(source_volume_id=source.volume_id, name="snap-1")
    snapshot = driver.controller.CreateSnapshot(snap_req).snapshot
    assert snapshot.ready_to_use and snapshot.source_volume_id == source.volume_id
    assert snapshot.size_bytes == source.capacity_bytes
    assert snapshot.creation_time.seconds > 0
    assert driver.controller.CreateSnapshot(snap_req).snapshot.snapshot_id == snapshot.snapshot_id
    expect(
        Code.ALREADY_EXISTS,
        "exists for another volume",
        driver.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(source_volume_id=other.volume_id, name="snap-1"),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "name is required",
        driver.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(source_volume_id=source.volume_id),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "source_volume_id is required",
        driver.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(name="n"),
    )
    expect(
        Code.NOT_FOUND,
        "volume pbd-x does not exist",
        driver.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(source_volume_id="pbd-x", name="n"),
    )

    second = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=other.volume_id, name="snap-2")
    ).snapshot
    list_snapshots = driver.controller.ListSnapshots
    by_id = list_snapshots(pb.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id))
    assert [e.snapshot.snapshot_id for e in by_id.entries] == [snapshot.snapshot_id]
    by_source = list_snapshots(pb.ListSnapshotsRequest(source_volume_id=other.volume_id))
    assert [e.snapshot.snapshot_id for e in by_source.entries] == [second.snapshot_id]
    assert not list_snapshots(pb.ListSnapshotsRequest(snapshot_id="pbs-none")).entries
    first_page = list_snapshots(pb.ListSnapshotsRequest(max_entries=1))
    assert len(first_page.entries) == 1 and first_page.next_token
    expect(
        Code.ABORTED, "starting_token", list_snapshots, pb.ListSnapshotsRequest(starting_token="x")
    )

    # A volume from the snapshot; too small a one is refused.
    expect(
        Code.OUT_OF_RANGE,
        "",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="from-snap-small",
            capacity_range=pb.CapacityRange(required_bytes=MIB, limit_bytes=2 * MIB),
            volume_capabilities=[mount_cap()],
            volume_content_source=from_snapshot(snapshot.snapshot_id),
        ),
    )
    restored = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="from-snap",
            volume_capabilities=[mount_cap()],
            volume_content_source=from_snapshot(snapshot.snapshot_id),
        )
    ).volume
    assert restored.capacity_bytes == snapshot.size_bytes
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id

    # Deleting the source keeps its storage while the snapshot and clone need it.
    storage = driver.base / "root/volumes" / source.volume_id
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=source.volume_id))
    assert storage.exists()
    listed = driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
    assert source.volume_id not in {e.volume.volume_id for e in listed}
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    assert storage.exists()  # the restored volume's first generation reads it
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=restored.volume_id))
    assert not storage.exists()
    expect(
        Code.INVALID_ARGUMENT,
        "snapshot_id is required",
        driver.controller.DeleteSnapshot,
        pb.DeleteSnapshotRequest(),
    )


# --- node argument checks (no mounting) ----------------------------------------------------


def test_snapshot_when_the_serving_daemon_is_gone(driver: Driver) -> None:
    """The node went down with the volume staged: its control socket stayed, nobody answers."""
    volume = create(driver, "orphaned", required=4 * MIB)
    stale = driver.base / "stale-control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()
    staged = driver.base / "root" / "csi" / "staged" / f"{volume.volume_id}.json"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(
        json.dumps(
            {
                "node_id": "gone-node",
                "control_socket": str(stale),
                "staging_path": str(driver.base / "nowhere"),
            }
        )
    )
    try:
        expect(
            Code.INTERNAL,
            f"connection refused on control socket {stale}: the socket is stale, "
            "no daemon is running there",
            driver.controller.CreateSnapshot,
            pb.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="orphan-snap"),
        )
    finally:
        staged.unlink()


def test_node_info_and_capabilities(driver: Driver) -> None:
    assert driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "test-node"
    caps = driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    rpc = pb.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps} == {
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.EXPAND_VOLUME,
        rpc.VOLUME_CONDITION,
    }


def test_encrypted_volumes_need_their_key_in_the_stage_secret(
    driver: Driver, tmp_path: Path
) -> None:
    caps = [mount_cap()]
    expect(
        Code.INVALID_ARGUMENT,
        'parameter encrypted=\'yes\': use "true" or "false"',
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(name="x", volume_capabilities=caps, parameters={"encrypted": "yes"}),
    )
    sealed = create(driver, "sealed", parameters={"encrypted": "true"}).volume_id
    plain = create(driver, "plain", parameters={"encrypted": "false"}).volume_id
    staging = str(tmp_path / "staging")

    def stage(vid: str, secrets: dict[str, str]) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=caps[0], secrets=secrets
        )

    expect(
        Code.INVALID_ARGUMENT,
        f"volume {sealed} is encrypted: NodeStageVolume needs its key in the secret "
        "encryptionKey; name a Secret holding it in the StorageClass",
        driver.node.NodeStageVolume,
        stage(sealed, {}),
    )
    expect(
        Code.INVALID_ARGUMENT,
        f"secret encryptionKey of volume {sealed}: it holds 5 bytes",
        driver.node.NodeStageVolume,
        stage(sealed, {"encryptionKey": "short"}),
    )
    expect(
        Code.INVALID_ARGUMENT,
        f"volume {plain} is not encrypted, but NodeStageVolume got the secret encryptionKey",
        driver.node.NodeStageVolume,
        stage(plain, {"encryptionKey": "ab" * 32}),
    )
    snapshot = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=sealed, name="sealed-snap")
    ).snapshot
    expect(
        Code.INVALID_ARGUMENT,
        f"snapshot {snapshot.snapshot_id} is of an encrypted volume: a volume made from it "
        "must be encrypted too",
        driver.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name="clone",
            volume_capabilities=caps,
            volume_content_source=from_snapshot(snapshot.snapshot_id),
        ),
    )
    clone = create(
        driver,
        "clone",
        parameters={"encrypted": "true"},
        volume_content_source=from_snapshot(snapshot.snapshot_id),
    )
    assert clone.volume_id != sealed


def test_node_argument_errors(driver: Driver, tmp_path: Path) -> None:
    volume = create(driver, "node-errors")
    vid = volume.volume_id
    stage = driver.node.NodeStageVolume
    staging = str(tmp_path / "staging")
    target = str(tmp_path / "target")
    cap = mount_cap()
    expect(
        Code.INVALID_ARGUMENT,
        "volume_id is required",
        stage,
        pb.NodeStageVolumeRequest(staging_target_path=staging, volume_capability=cap),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "staging_target_path is required",
        stage,
        pb.NodeStageVolumeRequest(volume_id=vid, volume_capability=cap),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "volume_capability is required",
        stage,
        pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging),
    )
    expect(  # the node RPCs' "exceeds capabilities"
        Code.FAILED_PRECONDITION,
        "MULTI_NODE_MULTI_WRITER",
        stage,
        pb.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=staging,
            volume_capability=mount_cap(mode=MODE.MULTI_NODE_MULTI_WRITER),
        ),
    )
    expect(
        Code.NOT_FOUND,
        "volume pbd-missing does not exist",
        stage,
        pb.NodeStageVolumeRequest(
            volume_id="pbd-missing", staging_target_path=staging, volume_capability=cap
        ),
    )
    publish = driver.node.NodePublishVolume
    expect(
        Code.INVALID_ARGUMENT,
        "target_path is required",
        publish,
        pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap
        ),
    )
    expect(  # the spec's "staging target path not set"
        Code.FAILED_PRECONDITION,
        "staging_target_path is required: stage the volume first",
        publish,
        pb.NodePublishVolumeRequest(volume_id=vid, target_path=target, volume_capability=cap),
    )
    expect(
        Code.FAILED_PRECONDITION,
        "access mode MULTI_NODE_READER_ONLY is not supported",
        publish,
        pb.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=staging,
            target_path=target,
            volume_capability=mount_cap(mode=MODE.MULTI_NODE_READER_ONLY),
        ),
    )
    expect(
        Code.NOT_FOUND,
        "volume pbd-missing does not exist",
        publish,
        pb.NodePublishVolumeRequest(
            volume_id="pbd-missing",
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
        ),
    )
    expect(
        Code.NOT_FOUND,
        "volume pbd-missing does not exist",
        driver.node.NodeUnpublishVolume,
        pb.NodeUnpublishVolumeRequest(volume_id="pbd-missing", target_path=target),
    )
    expect(
        Code.NOT_FOUND,
        "volume pbd-missing does not exist",
        driver.node.NodeUnstageVolume,
        pb.NodeUnstageVolumeRequest(volume_id="pbd-missing", staging_target_path=staging),
    )
    expect(
        Code.FAILED_PRECONDITION,
        "is not staged",
        publish,
        pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap
        ),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "target_path is required",
        driver.node.NodeUnpublishVolume,
        pb.NodeUnpublishVolumeRequest(volume_id=vid),
    )
    driver.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    )
    expect(
        Code.INVALID_ARGUMENT,
        "staging_target_path is required",
        driver.node.NodeUnstageVolume,
        pb.NodeUnstageVolumeRequest(volume_id=vid),
    )
    driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
    )
    expect(
        Code.NOT_FOUND,
        "does not exist",
        driver.node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(tmp_path / "nowhere")),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "volume_path is required",
        driver.node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vid),
    )
    expect(
        Code.NOT_FOUND,
        "is not staged on this node",
        driver.node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=target),
    )
    expect(
        Code.INVALID_ARGUMENT,
        "volume_path is required",
        driver.node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(volume_id=vid),
    )


# --- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "tcp://127.0.0.1:1", "--root", "file:///tmp/x"], "use unix:///"),
        (["--endpoint", "unix:///tmp/x.sock", "--root", "memory://"], "--root 'memory://'"),
    ],
)
def test_cli_errors(args: list[str], message: str) -> None:
    result = subprocess.run(
        [str(BIN / "portalbd-csi"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
