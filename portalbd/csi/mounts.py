"""Mount table queries and the few system tools the node service runs.

Every helper is safe to repeat: the node RPCs are retried by kubelet and
must converge on the same state however often they run.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from portalbd.csi.errors import internal

log = logging.getLogger("portalbd.csi")


class CommandFailed(Exception):
    def __init__(self, argv: list[str], code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {code}: {output.strip()[-2000:]}")
        self.code = code
        self.output = output


async def run(*argv: str, check: bool = True, timeout: float = 120) -> str:
    """Run a tool; return its combined output (raise CommandFailed on error)."""
    log.debug("running %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError as exc:
        raise internal(f"{argv[0]} is not installed on this node") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(list(argv), -9, f"timed out after {timeout}s") from None
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandFailed(list(argv), proc.returncode or 0, text)
    return text


def _unescape(field: str) -> str:
    """Mountinfo escapes space, tab, newline and backslash as octal."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, source, options) for every mount this process sees."""
    result = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 6 or len(rest) < 2:
                continue
            result.append((_unescape(fields[4]), _unescape(rest[1]), fields[5]))
    return result


def mount_of(path: str | Path) -> tuple[str, str] | None:
    """(source, options) of the topmost mount exactly at ``path``, if any."""
    target = os.path.realpath(path)
    found = None
    for point, source, options in mounts():
        if point == target:
            found = (source, options)
    return found


def is_mounted(path: str | Path) -> bool:
    return mount_of(path) is not None


async def unmount(path: str | Path) -> None:
    """Unmount every layer at ``path`` (a path mounted twice needs two)."""
    for _ in range(8):
        if not is_mounted(path):
            return
        await run("umount", str(path))
    raise internal(f"{path} is still mounted after repeated umount")


async def detect_fs(device: str) -> str:
    """The filesystem type on a device, or "" when it is blank."""
    out = await run("blkid", "-p", "-s", "TYPE", "-o", "value", device, check=False)
    return out.strip().splitlines()[0] if out.strip() else ""


async def make_fs(device: str, fs_type: str) -> None:
    if fs_type == "ext4":
        await run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1", device)
    elif fs_type == "xfs":
        await run("mkfs.xfs", "-q", "-f", "-K", device)
    else:
        raise internal(f"cannot make a {fs_type} filesystem")


async def grow_fs(device: str, mount_point: str, fs_type: str) -> None:
    if fs_type == "xfs":
        await run("xfs_growfs", mount_point)
    else:
        await run("resize2fs", device)
