"""The checked-in CSI stubs are what grpcio-tools makes of the checked-in proto."""

from __future__ import annotations

import subprocess
import sys
import tomllib
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


def test_stubs_declare_the_csi_extra_minimums() -> None:
    """The version guards in the checked-in stubs are pyproject's [csi] minimums."""
    project = tomllib.loads((stubs.PACKAGE_ROOT / "pyproject.toml").read_text())["project"]
    declared = dict(r.split(">=") for r in project["optional-dependencies"]["csi"])
    assert declared == stubs.RUNTIME_MINIMUMS
    checked_in = stubs.PACKAGE_ROOT / "portalbd/csi/proto"
    for name in stubs.OUTPUTS:
        text = (checked_in / name).read_text()
        assert stubs.declare_minimums(name, text) == text, f"{name} declares other minimums"
    grpc_stub = (checked_in / "csi_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{declared['grpcio']}'" in grpc_stub
    pb_stub = (checked_in / "csi_pb2.py").read_text()
    assert f"# Protobuf Python Version: {declared['protobuf']}\n" in pb_stub


def test_declaring_minimums_refuses_output_without_a_guard() -> None:
    with pytest.raises(ValueError, match=r"csi_pb2_grpc\.py: no version guard where the generator"):
        stubs.declare_minimums("csi_pb2_grpc.py", "import grpc\n")
    assert stubs.declare_minimums("csi_pb2.pyi", "x: int\n") == "x: int\n"


# Imports the stubs with the real grpc and protobuf, their version reported as
# VERSIONS[0] (grpcio) and VERSIONS[1] (protobuf): the guards run as they would
# on those runtimes. (Older runtimes cannot be installed here to run for real.)
# protobuf's own well-known types are loaded first, at the real version.
_LOAD = """
import sys
import grpc
from google.protobuf import descriptor_pb2, runtime_version, timestamp_pb2, wrappers_pb2
grpc.__version__ = sys.argv[1]
major, minor, patch = map(int, sys.argv[2].split("."))
runtime_version.MAJOR, runtime_version.MINOR, runtime_version.PATCH = major, minor, patch
import portalbd.csi.proto.csi_pb2_grpc
"""


def _load_stubs_as(grpcio: str, protobuf: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LOAD, grpcio, protobuf],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=stubs.PACKAGE_ROOT,
    )


def test_stubs_load_with_the_minimum_runtimes() -> None:
    p = _load_stubs_as(stubs.RUNTIME_MINIMUMS["grpcio"], stubs.RUNTIME_MINIMUMS["protobuf"])
    assert p.returncode == 0, p.stderr


def test_older_runtimes_are_refused_with_the_guards_message() -> None:
    p = _load_stubs_as("1.77.0", stubs.RUNTIME_MINIMUMS["protobuf"])
    assert "The grpc package installed is at version 1.77.0" in p.stderr, p.stderr
    assert "depends on grpcio>=1.78.0" in p.stderr
    p = _load_stubs_as(stubs.RUNTIME_MINIMUMS["grpcio"], "6.31.0")
    assert "gencode 6.31.1 runtime 6.31.0" in p.stderr, p.stderr
