"""The checked-in CSI stubs are what grpcio-tools makes of the checked-in proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from portalbd.csi import stubs


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = stubs.generate(tmp_path)
    checked_in = stubs.PACKAGE_ROOT / "portalbd/csi/proto"
    for path in fresh:
        mine = (checked_in / path.name).read_text()
        assert stubs.normalised(mine) == stubs.normalised(path.read_text()), (
            f"{path.name} is stale: run python -m portalbd.csi.stubs"
        )


def test_normalising_ignores_only_generator_versions() -> None:
    a = "# Protobuf Python Version: 7.35.1\nx = 1\nGRPC_GENERATED_VERSION = '1.85.1'\n"
    b = "# Protobuf Python Version: 9.0.0\nx = 1\nGRPC_GENERATED_VERSION = '2.0.0'\n"
    assert stubs.normalised(a) == stubs.normalised(b)
    assert stubs.normalised(a) != stubs.normalised(a.replace("x = 1", "x = 2"))


def test_proto_keeps_the_spec_names_and_numbers() -> None:
    from portalbd.csi.proto import csi_pb2 as pb

    assert pb.DESCRIPTOR.package == "csi.v1"
    fields = {f.name: f.number for f in pb.CreateVolumeRequest.DESCRIPTOR.fields}
    assert fields["name"] == 1 and fields["volume_content_source"] == 6
    fields = {f.name: f.number for f in pb.NodePublishVolumeRequest.DESCRIPTOR.fields}
    assert fields["readonly"] == 6 and fields["volume_context"] == 8
    services = {s.name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {"Identity", "Controller", "Node"}
