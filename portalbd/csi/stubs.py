"""Generate the Python gRPC stubs for ``portalbd/csi/proto/csi.proto``.

The stubs are checked in so installing portalbd never needs grpcio-tools;
a test regenerates them into a temporary directory and compares, so the
checked-in copy cannot drift from the proto. mypy-protobuf writes the
``.pyi`` files that keep the servicers and clients type-checked. Run after editing the proto::

    python -m portalbd.csi.stubs
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


def normalised(text: str) -> str:
    """The stub text without the generator-version lines."""
    return _VERSION_LINES.sub("", text)


def main() -> int:
    target = PACKAGE_ROOT / "portalbd/csi/proto"
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (target / path.name).write_text(path.read_text())
            print(f"wrote {target / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
