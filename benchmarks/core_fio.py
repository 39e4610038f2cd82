"""The core NBD benchmark: portalbd against reference servers, same fio jobs, one run.

Targets: portalbd on memory and on file storage, ``nbdkit memory`` (C) and
nbdkit's Python plugin on a bytearray (benchmarks/nbdkit_ramdisk.py). Jobs,
each over a 512 MiB region after a sequential prefill: 1 MiB sequential write
at depth 8, 4 KiB random read and write at queue depth 32, 1 MiB sequential
read at depth 8, in that order. Then
SlateDB alone from Python, writing the same bytes the way the daemon drains
them (batches of 64 KiB puts, over a prefilled region for the same time as
fio's job), as the ceiling for sequential writes; and the
daemon's RSS after each GiB of sequential writes with default settings.

    .venv/bin/python benchmarks/core_fio.py [--runtime S] [--only NAME,...] [--region-mib N]
        [--rss-gib N] [--skip-slatedb] [--skip-rss]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from portalbd.launch import LaunchError, free_port, serving, start
from portalbd.trace.provenance import check_baseline, tree_env

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
REGION = 512 * MiB
# --baseline: a checkout whose daemon the baseline-* targets run
BASELINE: list[Path | None] = [None]

# name, fio rw, block size, iodepth, reported as
JOBS = [
    ("4k randread", "randread", "4k", 32, "iops"),
    ("4k randwrite", "randwrite", "4k", 32, "iops"),
    ("1M seq write", "write", "1m", 8, "MiB/s"),
    ("1M seq read", "read", "1m", 8, "MiB/s"),
]
# The order the jobs run in: the sequential write first after the prefill, so
# it overwrites the same prefilled region the ceiling overwrites
# (slatedb_sequential), not one that random writes have just filled with
# page deltas for SlateDB to compact; the sequential read last, after them.
RUN_ORDER = ["1M seq write", "4k randread", "4k randwrite", "1M seq read"]
JOBS_IN_RUN_ORDER = [job for name in RUN_ORDER for job in JOBS if job[0] == name]


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    uri: str


@contextlib.contextmanager
def serve(name: str, workdir: Path) -> Iterator[Server]:
    """Start one target on a free port; stop it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    if name.startswith(("portalbd", "baseline")):
        # portalbd-memory, portalbd-file, and either with -encrypted (at rest);
        # baseline-memory and baseline-file: the daemon of another checkout
        kind = name.removesuffix("-encrypted")
        storage = f"file://{workdir}/data-{port}" if kind.endswith("-file") else None
        extra: list[str] = []
        if name.endswith("-encrypted"):
            key_file = workdir / f"{name}.key"
            key_file.write_text(os.urandom(32).hex())
            extra = ["--encryption-key-file", str(key_file)]
        env = None
        if name.startswith("baseline"):
            assert BASELINE[0] is not None, "baseline targets need --baseline DIR"
            env = tree_env(BASELINE[0])
        daemon = start(workdir, *extra, storage_url=storage, instance=name, port=port, env=env)
        try:
            yield Server(name, daemon.process, daemon.uri)
        finally:
            with contextlib.suppress(LaunchError):
                daemon.stop(120)
        return
    if name == "nbdkit-memory":
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1G"]
    else:
        script = REPO / "benchmarks" / "nbdkit_ramdisk.py"
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "python", str(script)]
        argv.append(f"size={1 << 30}")
    with serving(argv, port, workdir / f"{name}.log", what=name) as process:
        yield Server(name, process, f"nbd://127.0.0.1:{port}")


def fio(
    uri: str,
    rw: str,
    bs: str,
    iodepth: int,
    runtime: float | None,
    region: int = REGION,
    compress: int = 0,
) -> dict[str, float]:
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={region}",
        "--output-format=json",
    ]
    if runtime is not None:
        argv += [f"--runtime={runtime}", "--time_based", "--ramp_time=1"]
    if compress:
        # fio's buffers are random by default; real data compresses
        argv += [f"--buffer_compress_percentage={compress}", "--refill_buffers"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"iops": float(side["iops"]), "MiB/s": float(side["bw_bytes"]) / MiB}


def run_fio_suite(
    targets: list[str], runtime: float, workdir: Path, region: int = REGION, compress: int = 0
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name in targets:
        results[name] = {}
        with serve(name, workdir) as server:
            # prefill: reads see real data
            fio(server.uri, "write", "1m", 8, None, region, compress)
            for label, rw, bs, depth, unit in JOBS_IN_RUN_ORDER:
                value = fio(server.uri, rw, bs, depth, runtime, region, compress)[unit]
                results[name][label] = value
                print(f"  {name:16} {label:14} {value:10.0f} {unit}", flush=True)
            if name.startswith("portalbd"):
                ratio = binding_bytes_per_client_byte(workdir / f"{name}.sock")
                results[name]["binding bytes / client byte"] = ratio
                print(f"  {name:16} bytes through the binding per client byte: {ratio:.2f}")
    return results


def binding_bytes_per_client_byte(control: Path) -> float:
    """What the store was handed, per byte the clients wrote (status counters)."""
    from portalbd.control.client import ControlClient

    with ControlClient(control) as client:
        status = client.request("Status")["Status"]
    written = status["stats"]["bytes_written"]
    return float(status["stats"]["store"]["bytes_put"]) / written if written else float("nan")


async def slatedb_sequential(
    url: str, region: int, threads: int, runtime: float, batch_bytes: int = 4 * MiB
) -> float:
    """MiB/s of SlateDB alone, written the way the daemon drains: 64 KiB values
    in their envelope, 4 MiB batches built on ``threads`` worker threads with
    as many batches in flight as the daemon keeps, then a flush.

    Like fio's sequential write job: the region is written once first (not
    timed), then written over again and again for ``runtime`` seconds, so the
    ceiling pays for the flushes and compactions that overwrites cause, as
    the daemon does. A single pass into an empty database would measure a
    store with no compaction debt, which no fio job ever sees.
    """
    from functools import partial

    from portalbd.config import LsmConfig
    from portalbd.store import envelope
    from portalbd.store.location import parse_storage_url
    from portalbd.store.slate import SlateHandle, configure_io_threads, resolve_object_store

    configure_io_threads(threads)
    location = parse_storage_url(url)
    store = resolve_object_store(location.store_url)
    handle = await SlateHandle.open(store, location.path(f"bench-{threads}"), LsmConfig())
    value_size = 64 * 1024
    payload = os.urandom(value_size)
    per_batch = batch_bytes // value_size
    encode = partial(envelope.encode, seq=1)
    batches = [
        [((first + i).to_bytes(8, "big"), payload) for i in range(per_batch)]
        for first in range(0, region // value_size, per_batch)
    ]
    width = handle.parallelism

    async def one_pass(deadline: float) -> int:
        written = 0
        for i in range(0, len(batches), width):
            group = batches[i : i + width]
            await asyncio.gather(*(handle.write(b, encode=encode) for b in group))
            written += len(group) * batch_bytes
            if time.perf_counter() >= deadline:
                break
        return written

    await one_pass(float("inf"))
    await handle.flush()
    start = time.perf_counter()
    deadline = start + runtime
    written = 0
    while time.perf_counter() < deadline:
        written += await one_pass(deadline)
    await handle.flush()
    elapsed = time.perf_counter() - start
    await handle.close()
    return written / MiB / elapsed


def rss_after_writing(workdir: Path, gib: int = 2) -> list[dict[str, int]]:
    """The daemon's RSS (KiB) after each GiB of sequential writes.

    Default settings, file storage. A second GiB shows whether memory keeps
    growing with the data written or stays at the configured bounds.
    """
    daemon = start(
        workdir, storage_url=f"file://{workdir}/rss-data", disk_size_gb=gib, instance="rss"
    )
    process, port = daemon.process, daemon.port
    try:
        samples = [status_kib(process.pid)]
        for i in range(gib):
            result = subprocess.run(
                [
                    "fio",
                    "--name=fill",
                    "--ioengine=nbd",
                    f"--uri=nbd://127.0.0.1:{port}",
                    "--rw=write",
                    "--bs=1m",
                    "--iodepth=8",
                    f"--offset={i}g",
                    "--size=1g",
                ],
                capture_output=True,
                timeout=900,
            )
            if result.returncode != 0:
                raise SystemExit(
                    f"fio failed writing GiB {i}: {result.stderr.decode()[-500:]}\n"
                    f"daemon log:\n{daemon.log()[-3000:]}"
                )
            samples.append(status_kib(process.pid))
        return samples
    finally:
        with contextlib.suppress(LaunchError):
            daemon.stop(120)


def status_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0])
    return fields


def print_table(results: dict[str, dict[str, float]]) -> None:
    names = list(results)
    print()
    print(f"{'job':19}" + "".join(f"{n:>17}" for n in names))
    for label, _rw, _bs, _depth, unit in JOBS:
        row = f"{label + (' IOPS' if unit == 'iops' else ' MiB/s'):19}"
        row += "".join(f"{results[n].get(label, float('nan')):>17,.0f}" for n in names)
        print(row)
    base = [n for n in names if n.startswith("portalbd")]
    peers = [n for n in names if not n.startswith("portalbd")]
    if base and peers:
        print()
        for b in base:
            for p in peers:
                ratios = "  ".join(
                    f"{label}: {results[b][label] / results[p][label]:.2f}x" for label, *_ in JOBS
                )
                print(f"{b} / {p}: {ratios}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=8, help="seconds per fio job")
    parser.add_argument(
        "--only",
        default="portalbd-memory,portalbd-file,nbdkit-memory,nbdkit-python",
        help="comma-separated targets (portalbd-file-encrypted and "
        "portalbd-memory-encrypted serve an encrypted disk)",
    )
    parser.add_argument(
        "--region-mib",
        type=int,
        default=REGION // MiB,
        help="fio region (default 512; a region that fits the cache isolates the NBD path)",
    )
    parser.add_argument(
        "--compress",
        type=int,
        default=50,
        metavar="PERCENT",
        help="also run the jobs on data this compressible (0 skips that table)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a checkout of an earlier portalbd (e.g. git worktree add /tmp/before REV): "
        "targets baseline-memory and baseline-file run its daemon, for a before/after "
        "table in one run",
    )
    parser.add_argument("--skip-slatedb", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-gib", type=int, default=2, help="GiB to write for the RSS figures")
    args = parser.parse_args()
    if args.baseline is not None:
        try:
            BASELINE[0] = check_baseline(args.baseline)
        except LaunchError as exc:
            parser.error(str(exc))
    elif "baseline" in args.only:
        parser.error("baseline-* targets need --baseline DIR")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="portalbd-bench-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        region = args.region_mib * MiB
        print(f"fio region: {args.region_mib} MiB, {args.runtime:g} s per job")
        results = run_fio_suite(args.only.split(","), args.runtime, workdir, region)
        print_table(results)
        if args.compress:
            print(f"\nthe same jobs with fio --buffer_compress_percentage={args.compress}:")
            squeezed = run_fio_suite(
                args.only.split(","), args.runtime, workdir, region, args.compress
            )
            print_table(squeezed)
        if not args.skip_slatedb:
            print()
            from portalbd.config import default_io_threads

            threads = default_io_threads()
            for kind, url in (("memory", "memory:///"), ("file", f"file://{workdir}/slate")):
                ceilings = {
                    n: asyncio.run(slatedb_sequential(url, region, n, args.runtime))
                    for n in sorted({1, threads})
                }
                line = (
                    f"SlateDB alone ({kind}), 64 KiB values in 4 MiB batches, overwriting: "
                    + ", ".join(
                        f"{n} thread{'s' if n > 1 else ''} {v:,.0f} MiB/s"
                        for n, v in ceilings.items()
                    )
                )
                daemon = results.get(f"portalbd-{kind}", {}).get("1M seq write")
                if daemon:
                    line += (
                        f"; portalbd-{kind} seq write ({threads} threads) = "
                        f"{daemon / ceilings[threads]:.0%} of its ceiling"
                    )
                print(line)
        if not args.skip_rss:
            samples = rss_after_writing(workdir, args.rss_gib)
            print()
            print("portalbd RSS, default settings, file storage (VmRSS / VmHWM):")
            for i, fields in enumerate(samples):
                print(
                    f"  after {i} GiB written: {fields['VmRSS'] / 1024:.0f} MiB"
                    f" / peak {fields['VmHWM'] / 1024:.0f} MiB"
                )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
