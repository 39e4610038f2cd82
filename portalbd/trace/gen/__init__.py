"""`portalbd-trace gen`: record a trace of a real workload, and the registry of workloads.

Each workload is a module of this package with a ``workload(ctx)`` body and
a ``DEFAULT_SIZE``; what they share (the recording server, the block
device, cleanup) is in :mod:`portalbd.trace.gen.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from portalbd.trace.gen import minecraft, mkfs, pgbench
from portalbd.trace.gen.common import (
    GenContext,
    GenError,
    Workload,
    attach,
    check_tools,
    log,
    recording_server,
)


def workloads() -> dict[str, tuple[Workload, int]]:
    """name -> (body, default device size)."""
    return {
        "mkfs": (mkfs.workload, mkfs.DEFAULT_SIZE),
        "pgbench": (pgbench.workload, pgbench.DEFAULT_SIZE),
        "minecraft": (minecraft.workload, minecraft.DEFAULT_SIZE),
    }


def generate(
    name: str,
    out: Path,
    *,
    quick: bool = False,
    size: int | None = None,
    block_size: int | None = None,
    workdir: Path | None = None,
    server: str = "portalbd",
    client: str = "fuse",
) -> None:
    body, default_size = workloads()[name]
    if client == "kernel":
        if name != "mkfs":
            raise GenError("--client kernel runs only the mkfs workload (the guest has no "
                           "PostgreSQL or Node)")  # fmt: skip
        check_tools(["qemu-system-x86_64"])
    else:
        check_tools(["nbdfuse", "losetup", "fusermount3", "mount", "umount"])
    size = size or default_size
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"gen-{name}-")))
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)  # services running as other users reach their data below
        target = recording_server(stack, server, workdir, out, name, size, block_size)
        if client == "kernel":
            from portalbd.trace.gen.kernel import mkfs_in_guest

            mkfs_in_guest(target.uri, quick)
            target.finish()
            log(f"trace written to {out}")
            return
        with contextlib.ExitStack() as dev_stack:
            device = attach(dev_stack, target.uri, workdir)
            t0 = time.monotonic()
            body(GenContext(workdir=workdir, device=device, quick=quick, size=size))
            log(f"{name} workload ran for {time.monotonic() - t0:.1f}s")
        target.finish()
    log(f"trace written to {out}")


def run_generator(args: argparse.Namespace) -> int:
    try:
        generate(
            args.workload,
            args.out,
            quick=args.quick,
            size=args.size,
            block_size=args.block_size,
            workdir=args.workdir,
            server=args.server,
            client=args.client,
        )
    except GenError as e:
        print(f"portalbd-trace gen {args.workload}: {e}", file=sys.stderr)
        return 1
    return 0
