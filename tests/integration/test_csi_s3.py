"""The controller with its root in S3 (moto_server): records, offline
snapshots, clones and deletion all go through the bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd.csi.proto import csi_pb2 as pb
from tests.support.csi import Driver, mount_cap, running_driver
from tests.support.s3 import MotoServer, moto_server

MIB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket("csi")
        yield server


@pytest.fixture
def driver(s3: MotoServer, tmp_path: Path) -> Iterator[Driver]:
    with running_driver(tmp_path, mode="controller", root="s3://csi/k8s", env=s3.env()) as running:
        yield running


@pytest.mark.slow
def test_volume_snapshot_clone_delete_in_a_bucket(driver: Driver, s3: MotoServer) -> None:
    caps = [mount_cap()]
    volume = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="pvc-1",
            capacity_range=pb.CapacityRange(required_bytes=10 * MIB + 1),
            volume_capabilities=caps,
        )
    ).volume
    assert volume.capacity_bytes == 10 * MIB + 64 * 1024
    assert f"k8s/csi/volumes/{volume.volume_id}.json" in s3.keys("csi", "k8s/csi/")
    listed = driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in listed] == [volume.volume_id]

    snapshot = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap")
    ).snapshot
    assert any(k.startswith(f"k8s/volumes/{volume.volume_id}/gen/") for k in s3.keys("csi"))
    clone = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name="pvc-2",
            volume_capabilities=caps,
            volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
            ),
        )
    ).volume
    assert any(k.startswith(f"k8s/volumes/{clone.volume_id}/gen/") for k in s3.keys("csi"))

    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    for vid in (volume.volume_id, clone.volume_id):
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert s3.keys("csi", "k8s/volumes/") == []
    assert [k for k in s3.keys("csi", "k8s/csi/") if "/staged/" not in k] == []
    assert not driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
