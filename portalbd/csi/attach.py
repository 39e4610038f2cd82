"""Turn a portalbd NBD socket into a block device on this node, and back.

Where the kernel has an NBD client (``/sys/module/nbd`` and ``nbd-client``)
the device is ``/dev/nbdN``. Elsewhere nbdfuse exposes the export as a file
on a FUSE mount and a loop device turns that file into a block device. Both
paths are idempotent: attaching an attached volume returns its device, and
detaching a detached one does nothing.

On the nbdfuse path an nbdkit proxy sits between nbdfuse and the daemon, so
the daemon can go away and come back under a mounted filesystem: its retry
filter holds a failed request, reconnects once the restarted daemon answers
and sends the request again (nbdfuse keeps one connection for its lifetime
and has no reconnect of its own; this kernel has no device-mapper to swap
the device under the mount). Its truncate filter gives nbdfuse a fixed,
larger-than-any-volume file whatever the daemon serves; the loop device's
size limit is the volume's size. Growing a volume online is then: restart
the daemon with the new size, raise the loop's limit, grow the filesystem.

That reconnect is only safe after a clean exit. A daemon that was killed or
crashed lost the writes it had answered since the last flush; reconnected,
the filesystem would carry on over them. So after such an exit the
supervisor cuts the volume off (``cut_off``): the proxy and nbdfuse die,
every I/O on the device fails from then on, and unstaging cleans up a dead
FUSE mount.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import os
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

from portalbd.csi.errors import internal
from portalbd.csi.mounts import is_mounted, run
from portalbd.launch import LaunchError, pid_alive, spawn_async, wait_until_async

EXPORT = "portalbd"
# What nbdfuse sees through the proxy: the largest volume (controller.MAX_CAPACITY).
PROXY_SIZE = 1 << 44
# How long the proxy holds I/O while the daemon restarts: its retry filter
# tries again every second, this many times, before the request fails.
PROXY_RETRIES = 120
# linux/loop.h: struct loop_info64 and where lo_sizelimit sits in it.
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_STATUS64 = 0x4C04
LOOP_INFO64_SIZE = 232
LO_SIZELIMIT_OFFSET = 32


@dataclass(frozen=True, slots=True)
class Attachment:
    device: str
    method: str  # "kernel" or "nbdfuse"


def kernel_client_available() -> bool:
    return Path("/sys/module/nbd").exists() and shutil.which("nbd-client") is not None


def _fuse_paths(state_dir: Path) -> tuple[Path, Path]:
    mount_dir = state_dir / "fuse"
    return mount_dir, mount_dir / "disk"


def _loop_for(file: Path) -> str | None:
    """The loop device over ``file``, from sysfs: ``losetup -j`` stats the file,
    which fails (ENOTCONN) once the volume is cut off and its FUSE mount is
    dead; the kernel then shows the path with " (deleted)" after it."""
    wanted = os.path.realpath(file)  # what the kernel shows; works on a dead mount too
    for backing in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        with contextlib.suppress(OSError):  # detached in between
            shown = Path(backing).read_text().rstrip("\n").removesuffix(" (deleted)")
            if shown == wanted:
                return f"/dev/{Path(backing).parent.parent.name}"
    return None


def _nbd_device_for(state_dir: Path) -> str | None:
    try:
        device = (state_dir / "nbd-device").read_text().strip()
    except FileNotFoundError:
        return None
    name = os.path.basename(device)
    return device if Path(f"/sys/block/{name}/pid").exists() else None


async def attach(state_dir: Path, nbd_socket: Path, size: int) -> Attachment:
    """The volume as a block device of ``size`` bytes (the size its daemon serves)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if kernel_client_available():
        return await _attach_kernel(state_dir, nbd_socket)
    return await _attach_fuse(state_dir, nbd_socket, size)


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


def proxy_argv(state_dir: Path, nbd_socket: Path) -> list[str]:
    return [
        "nbdkit",
        "--foreground",
        "--unix",
        str(state_dir / "proxy.sock"),
        "--pidfile",
        str(state_dir / "proxy.pid"),
        "--filter=retry",  # outermost: a reconnect reopens the truncate filter too
        "--filter=truncate",
        "nbd",
        f"socket={nbd_socket}",
        f"export={EXPORT}",
        f"truncate={PROXY_SIZE}",
        f"retries={PROXY_RETRIES}",
        "retry-delay=1",
        "retry-exponential=no",
    ]


def _pid_in(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


async def _start_proxy(state_dir: Path, nbd_socket: Path) -> Path:
    """The volume's nbdkit proxy (started unless one runs); returns its socket."""
    socket, pidfile = state_dir / "proxy.sock", state_dir / "proxy.pid"
    if _pid_in(pidfile) is not None and socket.exists():
        return socket
    for stale in (socket, pidfile):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    proc = await spawn_async(
        proxy_argv(state_dir, nbd_socket), state_dir / "nbdkit.log", new_session=True
    )
    with contextlib.suppress(LaunchError):  # said below, with nbdkit's log
        await wait_until_async(
            lambda: pidfile.exists() and socket.exists(), lambda: proc.returncode, 15, "nbdkit"
        )
    if not socket.exists():
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        log = (state_dir / "nbdkit.log").read_text(errors="replace")[-1000:]
        raise internal(f"the nbdkit proxy did not start: {log.strip()}")
    return socket


def has_proxy(state_dir: Path) -> bool:
    """Does this volume's nbdfuse go through a running proxy (not straight to the daemon)?"""
    return _pid_in(state_dir / "proxy.pid") is not None


async def _stop_proxy(state_dir: Path) -> None:
    pidfile = state_dir / "proxy.pid"
    pid = _pid_in(pidfile)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(LaunchError):
            await wait_until_async(lambda: not pid_alive(pid), None, 10, "nbdkit to exit")
    for path in (pidfile, state_dir / "proxy.sock"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def cut_off(state_dir: Path) -> None:
    """SIGKILL the volume's proxy and nbdfuse, so that nothing reconnects the
    device to a restarted daemon: every further I/O on the loop device fails
    (EIO), as on a disk after a power cut, and the filesystem on it stops
    instead of carrying on over writes the dead daemon never made durable.
    SIGKILL, not SIGTERM: the proxy would hold its failed requests for the
    retry and nbdfuse would try to unmount. Safe to repeat.

    The kernel NBD client has no reconnect: its device is left as it is."""
    for name in ("proxy.pid", "nbdfuse.pid"):
        pid = _pid_in(state_dir / name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

        def dead(pid: int = pid) -> bool:
            return not pid_alive(pid)

        with contextlib.suppress(LaunchError):
            await wait_until_async(dead, None, 10, f"{name} to die", 0.05)
    for path in (state_dir / "proxy.pid", state_dir / "proxy.sock"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _attach_fuse(state_dir: Path, nbd_socket: Path, size: int) -> Attachment:
    mount_dir, disk = _fuse_paths(state_dir)
    proxy = await _start_proxy(state_dir, nbd_socket)
    if not is_mounted(mount_dir):
        mount_dir.mkdir(parents=True, exist_ok=True)
        pidfile = state_dir / "nbdfuse.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        proc = await spawn_async(
            ["nbdfuse", "-P", str(pidfile), str(disk), f"nbd+unix:///?socket={proxy}"],
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
    loop = _loop_for(disk)
    if loop is None:
        loop = (
            await run("losetup", "--find", "--show", "--sizelimit", str(size), str(disk))
        ).strip()
    return Attachment(loop, "nbdfuse")


def _set_sizelimit(device: str, size: int) -> None:
    """LOOP_SET_STATUS64 with a new lo_sizelimit: the kernel resizes the device
    (losetup can set the limit only when it binds the device)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        info = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        struct.pack_into("=Q", info, LO_SIZELIMIT_OFFSET, size)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
    finally:
        os.close(fd)


async def grow(attachment: Attachment, size: int) -> None:
    """Make the block device ``size`` bytes once its daemon serves that many."""
    if attachment.method == "nbdfuse":
        await asyncio.to_thread(_set_sizelimit, attachment.device, size)


async def current_device(state_dir: Path) -> Attachment | None:
    device = _nbd_device_for(state_dir)
    if device:
        return Attachment(device, "kernel")
    mount_dir, disk = _fuse_paths(state_dir)
    if is_mounted(mount_dir):
        loop = _loop_for(disk)
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
        await _stop_proxy(state_dir)  # a stage that failed before nbdfuse ran
        return
    while (loop := _loop_for(disk)) is not None:
        await run("blockdev", "--flushbufs", loop, check=False)
        await run("losetup", "-d", loop)

        def detached(loop: str = loop) -> bool:
            return _loop_for(disk) != loop

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
    await _stop_proxy(state_dir)
