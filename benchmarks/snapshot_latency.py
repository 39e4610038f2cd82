"""Snapshot create and restore latency against how much data the disk holds.

A snapshot is a SlateDB checkpoint and a restore a clone of one, so neither
should grow with the data written. This writes 64 MiB and 2 GiB (fio,
sequential 1 MiB writes, flushed) to a fresh disk on file storage, then
times, from the control client's side (request sent -> answer read):

- ``create``: a snapshot of an idle, flushed disk;
- ``create+dirty``: a snapshot right after 4 MiB of unflushed writes (the
  snapshot flushes them first, so this includes that flush);
- ``restore``: a restore with no client attached (clone, open, switch,
  collect the generation it replaced).

Each is tried 20 times; the table shows median, p99 (nearest rank: with 20
tries that is the slowest) and max, in milliseconds.

    .venv/bin/python benchmarks/snapshot_latency.py [--sizes 64,2048] [--tries 20]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portalbd.launch import Daemon, start

MIB = 1024 * 1024


def fill(uri: str, mib: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            "fio",
            "--name=fill",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=write",
            "--bs=1m",
            f"--size={mib}m",
            "--iodepth=16",
            "--end_fsync=1",
            "--refill_buffers",
        ],
        check=True,
        capture_output=True,
        timeout=3600,
    )
    return time.monotonic() - started


def timed(daemon: Daemon, request: object) -> float:
    started = time.perf_counter()
    reply = daemon.control(request, timeout=600)
    elapsed = time.perf_counter() - started
    if isinstance(reply, dict) and "Error" in reply:
        raise RuntimeError(f"{request}: {reply['Error']}")
    return elapsed * 1000


def dirty(daemon: Daemon, rng: random.Random) -> None:
    import nbd

    handle = nbd.NBD()
    handle.connect_uri(daemon.uri)
    try:
        for i in range(4):
            handle.pwrite(rng.randbytes(MIB), rng.randrange(64) * MIB + i)
    finally:
        handle.shutdown()


def wait_idle(daemon: Daemon) -> None:
    deadline = time.monotonic() + 15
    while daemon.status()["stats"]["connections"] and time.monotonic() < deadline:
        time.sleep(0.02)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def measure(workdir: Path, mib: int, tries: int) -> dict[str, list[float]]:
    storage = workdir / f"data-{mib}"
    size_gib = max(1, math.ceil(mib / 1024) + 1)
    daemon = start(
        workdir,
        storage_url=f"file://{storage}",
        disk_size_gb=size_gib,
        instance=f"bench{mib}",
    )
    rng = random.Random(mib)
    try:
        seconds = fill(daemon.uri, mib)
        print(f"# wrote {mib} MiB in {seconds:.1f}s ({mib / seconds:.0f} MiB/s)", flush=True)
        wait_idle(daemon)
        results: dict[str, list[float]] = {"create": [], "create+dirty": [], "restore": []}
        for i in range(tries):
            results["create"].append(timed(daemon, {"SnapshotCreate": {"name": f"idle{i}"}}))
        for i in range(tries):
            dirty(daemon, rng)
            wait_idle(daemon)
            results["create+dirty"].append(timed(daemon, {"SnapshotCreate": {"name": f"dirty{i}"}}))
        for i in range(tries):
            name = f"idle{i % 2}"  # alternate, so every restore changes the disk
            results["restore"].append(timed(daemon, {"SnapshotRestore": {"name": name}}))
        return results
    finally:
        daemon.stop(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,2048", help="MiB written before timing")
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: tmp)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = args.dir or Path(tempfile.mkdtemp(prefix="portalbd-snapbench-"))
    print(f"# file storage under {base}; {args.tries} tries each; {os.cpu_count()} CPUs")
    table: list[tuple[int, str, list[float]]] = []
    for mib in sizes:
        for op, values in measure(base, mib, args.tries).items():
            table.append((mib, op, values))
    print()
    print(f"{'written':>9}  {'operation':<13} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for mib, op, values in table:
        print(
            f"{mib:>5} MiB  {op:<13} {statistics.median(values):>10.1f} "
            f"{p99(values):>8.1f} {max(values):>8.1f}"
        )
    if args.dir is None:
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
