"""Turn a portalbd NBD socket into a block device on this node, and back.

Where the kernel has an NBD client (``/sys/module/nbd`` and ``nbd-client``)
the device is ``/dev/nbdN``. Elsewhere nbdfuse exposes the export as a file
on a FUSE mount and a loop device turns that file into a block device. Both
paths are idempotent: attaching an attached volume returns its device, and
detaching a detached one does nothing.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC240

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from portalbd.csi.errors import internal
from portalbd.csi.mounts import is_mounted, run
from portalbd.launch import LaunchError, pid_alive, spawn_async, wait_until_async

EXPORT = "portalbd"


@dataclass(frozen=True, slots=True)
class Attachment:
    device: str
    method: str  # "kernel" or "nbdfuse"


def kernel_client_available() -> bool:
    return Path("/sys/module/nbd").exists() and shutil.which("nbd-client") is not None


def _fuse_paths(state_dir: Path) -> tuple[Path, Path]:
    mount_dir = state_dir / "fuse"
    return mount_dir, mount_dir / "disk"


async def _loop_for(file: Path) -> str | None:
    out = await run("losetup", "-j", str(file), check=False)
    for line in out.splitlines():
        if line.startswith("/dev/loop"):
            return line.split(":", 1)[0]
    return None


def _nbd_device_for(state_dir: Path) -> str | None:
    try:
        device = (state_dir / "nbd-device").read_text().strip()
    except FileNotFoundError:
        return None
    name = os.path.basename(device)
    return device if Path(f"/sys/block/{name}/pid").exists() else None


async def attach(state_dir: Path, nbd_socket: Path) -> Attachment:
    state_dir.mkdir(parents=True, exist_ok=True)
    if kernel_client_available():
        return await _attach_kernel(state_dir, nbd_socket)
    return await _attach_fuse(state_dir, nbd_socket)


async def _attach_kernel(state_dir: Path, nbd_socket: Path) -> Attachment:
    existing = _nbd_device_for(state_dir)
    if existing:
        return Attachment(existing, "kernel")
    for sys_dir in sorted(glob.glob("/sys/block/nbd*")):
        name = os.path.basename(sys_dir)
        if Path(sys_dir, "pid").exists():
            continue
        device = f"/dev/{name}"
        try:
            await run("nbd-client", "-unix", str(nbd_socket), device, "-N", EXPORT, "-b", "4096")
        except Exception:
            continue  # taken by someone else in between: try the next one
        (state_dir / "nbd-device").write_text(device)
        return Attachment(device, "kernel")
    raise internal("no free /dev/nbd* device on this node")


async def _attach_fuse(state_dir: Path, nbd_socket: Path) -> Attachment:
    mount_dir, disk = _fuse_paths(state_dir)
    if not is_mounted(mount_dir):
        mount_dir.mkdir(parents=True, exist_ok=True)
        pidfile = state_dir / "nbdfuse.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        proc = await spawn_async(
            ["nbdfuse", "-P", str(pidfile), str(disk), f"nbd+unix:///{EXPORT}?socket={nbd_socket}"],
            state_dir / "nbdfuse.log",
            new_session=True,
        )
        with contextlib.suppress(LaunchError):  # said below, with nbdfuse's log
            await wait_until_async(
                lambda: pidfile.exists() and disk.exists(), lambda: proc.returncode, 15, "nbdfuse"
            )
        if not disk.exists():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            log = (state_dir / "nbdfuse.log").read_text(errors="replace")[-1000:]
            raise internal(f"nbdfuse did not expose the disk: {log.strip()}")
    loop = await _loop_for(disk)
    if loop is None:
        loop = (await run("losetup", "--find", "--show", str(disk))).strip()
    return Attachment(loop, "nbdfuse")


async def refresh_size(attachment: Attachment) -> None:
    """Make the block device notice that its backing export grew."""
    if attachment.method == "nbdfuse":
        await run("losetup", "--set-capacity", attachment.device)


async def current_device(state_dir: Path) -> Attachment | None:
    device = _nbd_device_for(state_dir)
    if device:
        return Attachment(device, "kernel")
    mount_dir, disk = _fuse_paths(state_dir)
    if is_mounted(mount_dir):
        loop = await _loop_for(disk)
        if loop:
            return Attachment(loop, "nbdfuse")
    return None


async def detach(state_dir: Path) -> None:
    """Flush and release the block device, then the FUSE mount."""
    device = _nbd_device_for(state_dir)
    if device:
        await run("blockdev", "--flushbufs", device, check=False)
        await run("nbd-client", "-d", device)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "nbd-device").unlink()
        return
    mount_dir, disk = _fuse_paths(state_dir)
    if not is_mounted(mount_dir):
        return
    while (loop := await _loop_for(disk)) is not None:
        await run("blockdev", "--flushbufs", loop, check=False)
        await run("losetup", "-d", loop)

        async def detached(loop: str = loop) -> bool:
            return await _loop_for(disk) != loop

        with contextlib.suppress(LaunchError):  # detach is asynchronous in the kernel
            await wait_until_async(detached, None, 5, f"{loop} to detach")
    await run("fusermount3", "-u", str(mount_dir))
    pidfile = state_dir / "nbdfuse.pid"
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(pidfile.read_text().strip())
        try:  # nbdfuse exits once unmounted
            await wait_until_async(lambda: not pid_alive(pid), None, 10, "nbdfuse to exit")
        except LaunchError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        pidfile.unlink()
