"""A real ext4 filesystem on the daemon's disk survives a daemon restart.

There is no ``nbd`` kernel module here, so the disk reaches the kernel as
nbdfuse's file behind a loop device. Everything attached is detached in
``finally`` blocks, even when a step fails half way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd.launch import LaunchError, spawn, wait_until
from tests.conftest import DaemonFactory
from tests.support.tools import quiet, run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/dev/fuse").exists()
    or not all(shutil.which(t) for t in ("nbdfuse", "losetup", "mkfs.ext4", "fusermount3")),
    reason="needs root, /dev/fuse, nbdfuse, losetup and mkfs.ext4",
)


@contextlib.contextmanager
def attached(uri: str, workdir: Path) -> Iterator[str]:
    """The export as a loop block device (nbdfuse file + losetup)."""
    fuse_dir = workdir / "fuse"
    fuse_dir.mkdir(parents=True, exist_ok=True)
    disk = fuse_dir / "disk"
    fuse = spawn(["nbdfuse", str(disk), uri], workdir / "nbdfuse.log")
    loop = ""
    try:
        try:
            wait_until(disk.exists, fuse, 30, "nbdfuse")
        except LaunchError as exc:
            raise AssertionError(f"{exc}: {(workdir / 'nbdfuse.log').read_text()}") from None
        loop = run("losetup", "--find", "--show", str(disk)).strip()
        yield loop
    finally:
        if loop:
            quiet("losetup", "-d", loop)
        quiet("fusermount3", "-u", str(fuse_dir))
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
            quiet("fusermount3", "-uz", str(fuse_dir))


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "ext4", device, str(where))
    try:
        yield where
    finally:
        for _ in range(20):
            if quiet("umount", str(where)):
                break
            time.sleep(0.25)
        else:
            quiet("umount", "-l", str(where))


def write_tree(root: Path, rng: random.Random) -> dict[str, str]:
    """Files of many sizes (tiny, block-sized, unaligned, several MiB) in nested dirs."""
    sums: dict[str, str] = {}
    sizes = [0, 1, 511, 4096, 65535, 65536, 65537, 1_000_000, 8 << 20]
    for i in range(60):
        sub = root / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        size = sizes[i % len(sizes)] if i < 2 * len(sizes) else rng.randrange(200_000)
        data = rng.randbytes(size)
        path = sub / f"f{i}.bin"
        path.write_bytes(data)
        sums[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    # overwrite the middle of a big file and delete some: not just appends
    big = next(p for p in sums if sums[p] and (root / p).stat().st_size == 8 << 20)
    with open(root / big, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"\xee" * 123_457)
    sums[big] = hashlib.sha256((root / big).read_bytes()).hexdigest()
    for victim in list(sums)[::10]:
        (root / victim).unlink()
        del sums[victim]
    os.sync()
    return sums


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.bin")
    }


def test_ext4_survives_daemon_restart(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/data"
    size = ("--size-bytes", str(256 << 20))
    first = daemon_factory(*size, storage_url=url, disk_size_gb=None)
    with attached(first.uri, tmp_path / "a1") as device:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", device)
        with mounted(device, tmp_path / "mnt") as root:
            expected = write_tree(root, random.Random(7))
    assert first.stop() == 0
    assert "shutdown complete flush=ok" in first.log()

    second = daemon_factory(*size, storage_url=url, disk_size_gb=None)
    with attached(second.uri, tmp_path / "a2") as device:
        fsck = subprocess.run(
            ["e2fsck", "-fn", device], capture_output=True, text=True, timeout=120, check=False
        )
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(device, tmp_path / "mnt") as root:
            assert checksums(root) == expected
            (root / "after-restart.txt").write_text("still writable\n")
    assert second.stop() == 0
