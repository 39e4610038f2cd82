"""The manifests in deploy/ agree with the driver they deploy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from portalbd.csi.common import DRIVER_NAME
from portalbd.csi.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SIDECARS = {
    "csi-provisioner",
    "csi-snapshotter",
    "csi-resizer",
    "csi-node-driver-registrar",
    "livenessprobe",
}


def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def test_every_manifest_is_listed_and_parses() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {d["kind"] for d in documents()}
    assert {
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
        "Deployment",
        "DaemonSet",
        "ClusterRole",
    } <= kinds


def test_driver_name_matches_everywhere() -> None:
    assert by_kind("CSIDriver")[0]["metadata"]["name"] == DRIVER_NAME
    assert by_kind("StorageClass")[0]["provisioner"] == DRIVER_NAME
    assert by_kind("VolumeSnapshotClass")[0]["driver"] == DRIVER_NAME
    node = by_kind("DaemonSet")[0]
    text = yaml.safe_dump(node)
    assert f"/var/lib/kubelet/plugins/{DRIVER_NAME}" in text


def test_driver_arguments_parse_and_sidecars_share_its_socket() -> None:
    images: set[str] = set()
    for workload in by_kind("Deployment") + by_kind("DaemonSet"):
        containers = workload["spec"]["template"]["spec"]["containers"]
        driver = next(c for c in containers if c["name"] == "portalbd-csi")
        args = build_parser().parse_args(driver["args"])
        assert args.endpoint == "unix:///csi/csi.sock"
        for sidecar in containers:
            if sidecar is driver:
                continue
            image = sidecar["image"]
            assert re.search(r":v\d+\.\d+\.\d+$", image), image
            images.add(image.rsplit("/", 1)[1].split(":")[0])
            assert "--csi-address=/csi/csi.sock" in sidecar["args"]
    assert images == SIDECARS


def test_storage_class_parameters_are_accepted() -> None:
    from portalbd.csi.controller import parse_parameters

    params = by_kind("StorageClass")[0]["parameters"]
    assert parse_parameters(params) == ("ext4", 65536)
