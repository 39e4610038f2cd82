"""Running portalbd-csi for tests, and leaving nothing behind.

Everything a test's driver creates (mounts, loop devices, nbdfuse and
portalbd processes) lives under one temporary directory, so cleanup can find
it all by path even when the test failed half way through a stage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from portalbd.csi.mounts import mounts
from portalbd.csi.proto import csi_pb2 as pb
from portalbd.csi.proto import csi_pb2_grpc as pb_grpc
from portalbd.launch import LaunchError, spawn, stop_process, wait_until
from tests.support import BIN
from tests.support.tools import quiet, run

MODE = pb.VolumeCapability.AccessMode.Mode


def mount_cap(fs_type: str = "", mode: int = MODE.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=MODE.SINGLE_NODE_WRITER),
    )


@dataclass
class Driver:
    process: subprocess.Popen[bytes]
    base: Path
    state: Path
    socket: Path
    log_path: Path
    channel: grpc.Channel
    identity: pb_grpc.IdentityStub
    controller: pb_grpc.ControllerStub
    node: pb_grpc.NodeStub

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_driver(
    base: Path,
    *extra: str,
    mode: str = "all",
    state: Path | None = None,
    root: str | None = None,
    env: dict[str, str] | None = None,
) -> Driver:
    base.mkdir(parents=True, exist_ok=True)
    state = state or base / "state"
    socket = base / "csi.sock"
    log_path = base / "csi.log"
    argv = [
        str(BIN / "portalbd-csi"),
        "--endpoint",
        f"unix://{socket}",
        "--root",
        root or f"file://{base}/root",
        "--state-dir",
        str(state),
        "--node-id",
        "test-node",
        "--mode",
        mode,
        "--log-level",
        "debug",
        *extra,
    ]
    process = spawn(argv, log_path, env=env)
    try:
        wait_until(socket.exists, process, 30, "portalbd-csi")
    except LaunchError as exc:
        process.kill()
        process.wait()
        raise LaunchError(f"{exc}:\n{log_path.read_text()}") from None
    channel = grpc.insecure_channel(f"unix://{socket}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return Driver(
        process,
        base,
        state,
        socket,
        log_path,
        channel,
        pb_grpc.IdentityStub(channel),
        pb_grpc.ControllerStub(channel),
        pb_grpc.NodeStub(channel),
    )


def stop_driver(driver: Driver) -> None:
    driver.channel.close()
    with contextlib.suppress(LaunchError):  # killed after 30 s: cleanup_tree does the rest
        stop_process(driver.process, 30, "portalbd-csi")


def cleanup_tree(base: Path) -> None:
    """Undo whatever a driver left under ``base``: mounts, loops, FUSE, processes."""
    prefix = str(base.resolve())
    inside = [(p, fs) for p, fs, _ in mounts() if p == prefix or p.startswith(prefix + "/")]
    fuse = [p for p, source in inside if source == "/dev/fuse"]
    others = [p for p, source in inside if source != "/dev/fuse"]
    for point in sorted(others, key=len, reverse=True):
        quiet("fsfreeze", "--unfreeze", point)
        quiet("umount", point)
        if any(p == point for p, _, _ in mounts()):
            quiet("umount", "-l", point)
    loops = run("losetup", "-a")
    for line in loops.splitlines():
        if prefix in line:
            quiet("losetup", "-d", line.split(":", 1)[0])
    for point in sorted(fuse, key=len, reverse=True):
        quiet("fusermount3", "-u", point)
        if any(p == point for p, _, _ in mounts()):
            quiet("fusermount3", "-uz", point)
    for pid in _processes_mentioning(prefix):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(LaunchError):  # killed next
        wait_until(lambda: not _processes_mentioning(prefix), None, 20, "the processes", 0.1)
    for pid in _processes_mentioning(prefix):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


@contextlib.contextmanager
def running_driver(
    base: Path,
    *extra: str,
    mode: str = "all",
    root: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Driver]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp paths are too
    # long for the per-volume sockets, so the state lives in a short one.
    state = Path(tempfile.mkdtemp(prefix="pbdcsi-", dir="/tmp"))
    try:
        driver = start_driver(base, *extra, mode=mode, state=state, root=root, env=env)
        try:
            yield driver
        finally:
            stop_driver(driver)
    finally:
        cleanup_tree(base)
        cleanup_tree(state)
        shutil.rmtree(state, ignore_errors=True)


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    """Call an RPC that must fail; return the error for its code and message."""
    try:
        call(request)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} succeeded but should have failed")
