"""mkfs workload: make ext4 and xfs, mount each, unpack a file tree, sync.

The file tree is this machine's Python standard library (many small files
and directories, like a system image), packed once into a tarball outside
the device so only the unpacking is recorded.  `--quick` unpacks a subset.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from portalbd.trace.gen.common import GIB, GenContext, log, mounted, run

DEFAULT_SIZE = 1 * GIB
QUICK_DIRS = ("email", "json", "http", "logging", "xml")


def _tarball(ctx: GenContext) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tar = ctx.workdir / "tree.tar"
    members = [d for d in QUICK_DIRS if (stdlib / d).is_dir()] if ctx.quick else ["."]
    run(["tar", "-cf", str(tar), "--exclude=__pycache__", "-C", str(stdlib), *members])
    return tar


def workload(ctx: GenContext) -> None:
    tar = _tarball(ctx)
    for fs, mkfs in (("ext4", ["mkfs.ext4", "-F", "-q"]), ("xfs", ["mkfs.xfs", "-f", "-q"])):
        log(f"{mkfs[0]} {ctx.device}")
        run([*mkfs, str(ctx.device)])
        with mounted(ctx.device, ctx.workdir / f"mnt-{fs}") as mnt:
            log(f"unpacking {tar.stat().st_size >> 20} MiB into {fs}")
            run(["tar", "-xf", str(tar), "-C", str(mnt)])
            run(["sync", "-f", str(mnt)])
