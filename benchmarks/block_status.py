"""Block status (base:allocation) speed: portalbd (memory storage) against ``nbdkit memory``.

A client maps a disk before copying it (``nbdcopy``, ``qemu-img convert``,
``nbdinfo --map``), so a map that costs time in proportion to the disk size
instead of to the data written makes every sparse copy slow. Cases, each on a
fresh server of the same size for both targets:

- ``nbdinfo --map`` of a whole empty 4 GiB disk;
- the same after 64 MiB written as 1024 scattered 64 KiB blocks;
- the same after 1 MiB written at the start of every 16th MiB (256 MiB of
  data in 256 regular extents, a layout both servers keep the same way);
- a libnbd ``block_status`` loop over the first 64 GiB of an empty 1 EiB disk
  (bounded, so a server that walks its whole address space cannot hang the run);
- the same after 64 MiB scattered over those 64 GiB;
- the same after 1 MiB written at the start of every GiB of those 64 GiB.

Each map runs in a child process with a timeout (a slow one prints
``>timeout``, with how far the libnbd loop got). The first map on a fresh
server is shown as cold and the median of the other ``--repeat`` - 1 as warm
(a server may cache what the first map found), with the number of extents
the client saw and portalbd's time as a multiple of nbdkit's.

    .venv/bin/python benchmarks/block_status.py [--timeout S] [--repeat N] [--only NAME,...]
        [--cases NAME;...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portalbd.launch import free_port, serving, start

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
EiB = 1 << 60
SCATTER_BLOCK = 64 * KiB
SCATTER_TOTAL = 64 * MiB
# The largest block status request a 32-bit NBD count allows, 4 KiB aligned.
MAX_REQUEST = (1 << 32) - 4 * KiB
TARGETS = ["portalbd-memory", "nbdkit-memory"]


@dataclass(frozen=True)
class Case:
    name: str
    disk_bytes: int
    map_bytes: int  # mapped range [0, map_bytes)
    scattered: bool
    tool: str  # "nbdinfo" (the whole disk) or "libnbd" (a block_status loop)
    stride: int = 0  # instead of scattering: 1 MiB written at every multiple of this


CASES = [
    Case("4G empty", 4 * GiB, 4 * GiB, False, "nbdinfo"),
    Case("4G 64M scattered", 4 * GiB, 4 * GiB, True, "nbdinfo"),
    Case("4G 1M every 16M", 4 * GiB, 4 * GiB, False, "nbdinfo", stride=16 * MiB),
    Case("1E empty, first 64G", EiB, 64 * GiB, False, "libnbd"),
    Case("1E 64M scattered, 64G", EiB, 64 * GiB, True, "libnbd"),
    Case("1E 1M every 1G, 64G", EiB, 64 * GiB, False, "libnbd", stride=GiB),
]


def import_nbd() -> Any:
    """Debian's libnbd binding (python3-libnbd), also from a venv without system packages."""
    try:
        import nbd
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")
        import nbd
    return nbd


@contextlib.contextmanager
def serve(name: str, size: int, workdir: Path) -> Iterator[str]:
    """Start one target of ``size`` bytes on a free port; yield its URI; stop it afterwards."""
    port = free_port()
    if name == "portalbd-memory":
        daemon = start(workdir, disk_size_gb=size // GiB, instance=f"bench-bs-{port}", port=port)
        try:
            yield daemon.uri
        finally:
            daemon.stop()
    elif name == "nbdkit-memory":
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", f"size={size}"]
        with serving(argv, port, workdir / f"{name}-{port}.log", what=name, stop_timeout=60):
            yield f"nbd://127.0.0.1:{port}"
    else:
        raise ValueError(f"unknown target {name}")


def scatter(uri: str, span: int, seed: int = 1) -> None:
    """Write SCATTER_TOTAL bytes as SCATTER_BLOCK blocks at distinct random offsets in [0, span)."""
    nbd = import_nbd()
    rng = random.Random(seed)
    slots = rng.sample(range(span // SCATTER_BLOCK), SCATTER_TOTAL // SCATTER_BLOCK)
    payload = os.urandom(SCATTER_BLOCK)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for slot in sorted(slots):
            h.pwrite(payload, slot * SCATTER_BLOCK)
        h.flush()
    finally:
        h.shutdown()


def stripes(uri: str, span: int, stride: int) -> None:
    """Write 1 MiB of random data at every multiple of ``stride`` in [0, span)."""
    nbd = import_nbd()
    payload = os.urandom(MiB)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for offset in range(0, span, stride):
            h.pwrite(payload, offset)
        h.flush()
    finally:
        h.shutdown()


def block_status_loop(uri: str, length: int, budget: float) -> dict[str, float]:
    """Map [0, length) with base:allocation requests, each from the end of the last extent seen.

    Stops early once ``budget`` seconds have passed, reporting how far it got.
    """
    nbd = import_nbd()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    extents = 0
    requests = 0
    offset = 0
    start = time.perf_counter()

    def callback(metacontext: str, _start: int, entries: list[int], _err: Any) -> int:
        nonlocal offset, extents
        if metacontext == "base:allocation":
            for i in range(0, len(entries), 2):
                offset += entries[i]
                extents += 1
        return 0

    timed_out = False
    while offset < length:
        if time.perf_counter() - start > budget:
            timed_out = True
            break
        before = offset
        h.block_status(min(MAX_REQUEST, length - offset), offset, callback)
        requests += 1
        if offset == before:
            raise RuntimeError(f"block status at {offset} made no progress")
    elapsed = time.perf_counter() - start
    h.shutdown()
    return {
        "seconds": elapsed,
        "extents": extents,
        "requests": requests,
        "mapped": min(offset, length),
        "timed_out": float(timed_out),
    }


def measure(case: Case, uri: str, timeout: float) -> dict[str, float]:
    """One mapping of the case's range in a child process (``timed_out`` 1.0 if it ran out)."""
    if case.tool == "nbdinfo":
        argv = ["nbdinfo", "--map", uri]
        limit = timeout
    else:
        argv = [sys.executable, __file__, "--worker", uri, str(case.map_bytes), str(timeout)]
        limit = timeout + 60  # the worker stops itself; this is for a request that never returns
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=True)
    except subprocess.TimeoutExpired:
        return {"seconds": time.perf_counter() - start, "timed_out": 1.0, "mapped": -1}
    elapsed = time.perf_counter() - start
    if case.tool == "nbdinfo":
        lines = len(done.stdout.splitlines())
        return {"seconds": elapsed, "extents": lines, "timed_out": 0.0, "mapped": case.map_bytes}
    result: dict[str, float] = json.loads(done.stdout)
    return result


@dataclass
class Runs:
    """The first (cold: nothing about the disk cached yet) and the median later (warm) mapping."""

    cold: dict[str, float]
    warm: dict[str, float] | None


def run_case(case: Case, target: str, timeout: float, repeat: int, workdir: Path) -> Runs:
    with serve(target, case.disk_bytes, workdir) as uri:
        if case.scattered:
            scatter(uri, case.map_bytes)
        elif case.stride:
            stripes(uri, case.map_bytes, case.stride)
        cold = measure(case, uri, timeout)
        later: list[dict[str, float]] = []
        if not cold["timed_out"]:
            for _ in range(repeat - 1):
                result = measure(case, uri, timeout)
                later.append(result)
                if result["timed_out"]:
                    return Runs(cold, result)
        if not later:
            return Runs(cold, None)
        later.sort(key=lambda r: r["seconds"])
        return Runs(cold, later[(len(later) - 1) // 2])  # the median (the lower of two)


def fmt_seconds(result: dict[str, float] | None) -> str:
    if result is None:
        return "-"
    if not result["timed_out"]:
        return f"{result['seconds']:.3f}"
    if result.get("mapped", -1) >= 0:
        return f">timeout({result['mapped'] / GiB:.2f}G)"
    return ">timeout"


def fmt_extents(result: dict[str, float] | None) -> str:
    if result is None or result["timed_out"]:
        return "-"
    return f"{result['extents']:.0f}"


def ratio(ours: dict[str, float] | None, peer: dict[str, float] | None) -> str:
    if ours is None or peer is None:
        return "-"
    if ours["timed_out"]:
        return ">timeout"
    if peer["timed_out"]:
        return "peer timeout"
    return f"{ours['seconds'] / max(peer['seconds'], 1e-9):.1f}x"


def print_table(
    cases: list[Case], targets: list[str], results: dict[tuple[str, str], Runs]
) -> None:
    both = "portalbd-memory" in targets and "nbdkit-memory" in targets
    print()
    print("seconds; cold = first map on a fresh server, warm = median later map; (NG) = mapped")
    print("when the timeout hit; ratio = portalbd-memory time / nbdkit-memory time")
    header = f"{'case':24}{'tool':>8}"
    for target in targets:
        header += f"{target + ' cold':>26}{'warm':>9}{'extents':>8}"
    if both:
        header += f"{'ratio cold':>12}{'ratio warm':>12}"
    print(header)
    for case in cases:
        row = f"{case.name:24}{case.tool:>8}"
        for target in targets:
            runs = results[(case.name, target)]
            row += f"{fmt_seconds(runs.cold):>26}{fmt_seconds(runs.warm):>9}"
            row += f"{fmt_extents(runs.cold):>8}"
        if both:
            ours = results[(case.name, "portalbd-memory")]
            peer = results[(case.name, "nbdkit-memory")]
            row += f"{ratio(ours.cold, peer.cold):>12}{ratio(ours.warm, peer.warm):>12}"
        print(row)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        uri, length, budget = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        print(json.dumps(block_status_loop(uri, length, budget)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120, help="seconds per measurement")
    parser.add_argument(
        "--repeat", type=int, default=4, help="maps per case: one cold, the median other is warm"
    )
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument(
        "--cases",
        default=";".join(c.name for c in CASES),
        help="semicolon-separated case names",
    )
    args = parser.parse_args()
    for tool in ("nbdinfo", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    import_nbd()
    targets = args.only.split(",")
    wanted = args.cases.split(";")
    cases = [c for c in CASES if c.name in wanted]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cpus: {os.cpu_count()}")
    print(f"timeout {args.timeout:g} s per map; {args.repeat} maps per case (1 cold)")
    results: dict[tuple[str, str], Runs] = {}
    with tempfile.TemporaryDirectory(prefix="portalbd-bench-", dir="/var/tmp") as tmp:
        for case in cases:
            for target in targets:
                runs = run_case(case, target, args.timeout, args.repeat, Path(tmp))
                results[(case.name, target)] = runs
                print(
                    f"  {target:16} {case.name:24} cold {fmt_seconds(runs.cold)} s,"
                    f" warm {fmt_seconds(runs.warm)} s, extents {fmt_extents(runs.cold)}",
                    flush=True,
                )
    print_table(cases, targets, results)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
