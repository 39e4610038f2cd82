"""What the three CSI services share: names, capability checks, the RPC wrapper."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from portalbd.control.errors import ControlError
from portalbd.csi.errors import CsiError, invalid
from portalbd.csi.mounts import CommandFailed
from portalbd.csi.proto import csi_pb2 as pb
from portalbd.store.slate import StoreError

log = logging.getLogger("portalbd.csi")

DRIVER_NAME = "portalbd.csi.kyro.dev"
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"
# The smallest device each mkfs makes a working filesystem on (measured with
# the options mounts.make_fs passes): xfsprogs refuses below 300 MiB; below
# 2 MiB mkfs.ext4 leaves out the journal, and under 256 KiB it fails outright.
FS_MIN_BYTES = {"ext4": 2 << 20, "xfs": 300 << 20}

Mode = pb.VolumeCapability.AccessMode.Mode
# One daemon serves a volume, on one node: single-node modes only.
SUPPORTED_MODES = {
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
}


def capability_problem(cap: Any) -> str | None:
    """Why a VolumeCapability cannot be served, or None when it can."""
    if not cap.HasField("access_mode"):
        return "volume capability has no access mode"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return f"access mode {Mode.Name(cap.access_mode.mode)} is not supported (single node only)"
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability needs an access type (mount or block)"
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
        supported = ", ".join(FS_TYPES)
        return f"filesystem {cap.mount.fs_type!r} is not supported; use one of {supported}"
    return None


def check_capabilities(caps: Any) -> None:
    if not caps:
        raise invalid("volume capabilities are required")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise invalid(problem)


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Any], Awaitable[Resp]]


def rpc(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn our exceptions into gRPC statuses; log every failure once."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Any) -> Resp:
        name = handler.__name__
        try:
            return await handler(self, request, context)
        except CsiError as exc:
            log.info("%s -> %s: %s", name, exc.code.name, exc.message)
            await context.abort(exc.code, exc.message)
        except StoreError as exc:
            log.error("%s: storage: %s", name, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"storage: {exc}")
        except (CommandFailed, ControlError) as exc:
            log.error("%s: %s", name, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except (OSError, ValueError, KeyError) as exc:
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
