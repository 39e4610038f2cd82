"""Generate the Python gRPC stubs for ``portalbd/csi/proto/csi.proto``.

The stubs are checked in so installing portalbd never needs grpcio-tools;
a test regenerates them into a temporary directory and compares, so the
checked-in copy cannot drift from the proto. mypy-protobuf writes the
``.pyi`` files that keep the servicers and clients type-checked. Run after editing the proto::

    python -m portalbd.csi.stubs

The generator writes its own version into the stubs as the oldest runtime
they load with, although what it generates does not change between
releases (``normalised`` drops only those lines, and a fresh generation
matches). The stubs declare ``RUNTIME_MINIMUMS`` instead, the ``[csi]``
minimums in pyproject.toml: the grpcio and protobuf that nixpkgs builds, so
the Nix package's CSI driver starts with them.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # holds portalbd/
PROTO = "portalbd/csi/proto/csi.proto"
OUTPUTS = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi")

# The oldest runtimes the stubs accept (pyproject.toml's [csi] extra says the
# same; tests/unit/test_csi_stubs.py holds them together).
RUNTIME_MINIMUMS = {"grpcio": "1.78.0", "protobuf": "6.31.1"}

_PROTOBUF_GUARD = re.compile(
    r"(# Protobuf Python Version: )[\d.]+(\n.*?ValidateProtobufRuntimeVersion\(\n"
    r"\s+_runtime_version\.Domain\.PUBLIC,\n)\s+\d+,\n\s+\d+,\n\s+\d+,\n",
    re.DOTALL,
)
_GRPC_GUARD = re.compile(r"^GRPC_GENERATED_VERSION = '[\d.]+'$", re.MULTILINE)

# Lines that name the generator's version: they differ between grpcio-tools
# releases without the stubs meaning anything different.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|"
    r"_runtime_version\.ValidateProtobufRuntimeVersion\(.*|\s+_runtime_version\.Domain\.PUBLIC,.*|"
    r"\s+\d+,\s*|\s+'',\s*)$",
    re.MULTILINE,
)


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) and mypy-protobuf into ``out_root``/portalbd/csi/proto."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - test extra
        raise SystemExit("grpcio-tools is needed: pip install -e '.[test]'") from exc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    plugins = []
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        found = Path(sys.executable).parent / plugin
        if not found.exists():
            found = Path(shutil.which(plugin) or plugin)
        plugins.append(f"--plugin={plugin}={found}")
    (out_root / "portalbd/csi/proto").mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PACKAGE_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            *plugins,
            f"--mypy_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            str(PACKAGE_ROOT / PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return [out_root / "portalbd/csi/proto" / name for name in OUTPUTS]


def declare_minimums(name: str, text: str) -> str:
    """``text`` of the generated file ``name`` with its version guard set to
    ``RUNTIME_MINIMUMS``; files without a guard come back unchanged."""
    if name == "csi_pb2.py":
        major, minor, patch = RUNTIME_MINIMUMS["protobuf"].split(".")
        new, count = _PROTOBUF_GUARD.subn(
            lambda m: (
                f"{m[1]}{RUNTIME_MINIMUMS['protobuf']}{m[2]}"
                f"    {major},\n    {minor},\n    {patch},\n"
            ),
            text,
        )
    elif name == "csi_pb2_grpc.py":
        new, count = _GRPC_GUARD.subn(
            f"GRPC_GENERATED_VERSION = '{RUNTIME_MINIMUMS['grpcio']}'", text
        )
    else:
        return text
    if count != 1:
        raise ValueError(f"{name}: no version guard where the generator used to write one")
    return new


def normalised(text: str) -> str:
    """The stub text without the generator-version lines."""
    return _VERSION_LINES.sub("", text)


def main() -> int:
    target = PACKAGE_ROOT / "portalbd/csi/proto"
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (target / path.name).write_text(declare_minimums(path.name, path.read_text()))
            print(f"wrote {target / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
