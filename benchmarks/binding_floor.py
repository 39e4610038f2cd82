"""What the SlateDB binding alone costs per call, from Python, with nothing of portalbd's around it.

The floor under every data-plane figure: a 4 KiB random read that misses the
cache costs at least one ``Db.get`` of its block, a 4 KiB random write at
least one ``WriteBatch.put`` of its page when it is drained, and a FLUSH a
``Db.write`` and a ``Db.flush``. This measures those calls on memory storage
with the daemon's own SlateDB settings (64 KiB SST blocks, its block cache),
values of a block's and a page's size in their envelope, gets at several
numbers in flight, and prints the calling thread's CPU per call (where
UniFFI polls the Rust future: SlateDB's lookup and the per-byte copy of the
returned value run there) beside the process's.

For scale, in the same run: nbdkit's Python plugin (benchmarks/nbdkit_ramdisk.py)
under core_fio.py's 4 KiB random read job, per request, as wall time and as
the CPU nbdkit spent: a whole read through the peer against one call here.

    .venv/bin/python benchmarks/binding_floor.py [--blocks N] [--gets N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.core_fio import REGION, fio, serve
from portalbd.config import LsmConfig
from portalbd.store.binding import sdb
from portalbd.store.slate import _SST_BLOCK_SIZES, _build_batch, _with_block_cache, build_settings

ENVELOPE = 9  # portalbd/store/envelope.py
BLOCK = 64 * 1024
PAGE = 4096
DEPTHS = (1, 4, 32)


async def open_db() -> object:
    lsm = LsmConfig()
    builder = sdb.DbBuilder("floor", sdb.ObjectStore.resolve("memory:///"))
    builder.with_settings(build_settings(lsm))
    _with_block_cache(builder, lsm, small=False)
    sst_block = lsm.sst_block_bytes()
    if sst_block:
        builder.with_sst_block_size(getattr(sdb.SstBlockSize, _SST_BLOCK_SIZES[sst_block]))
    return await builder.build()


Clocks = tuple[float, float]  # (this thread's CPU, the process's CPU), seconds


def cpu_us(before: Clocks, after: Clocks, calls: int) -> Clocks:
    return (
        (after[0] - before[0]) / calls * 1e6,
        (after[1] - before[1]) / calls * 1e6,
    )


def clocks() -> Clocks:
    return time.thread_time(), time.process_time()


async def fill(db: object, count: int, size: int) -> list[bytes]:
    """``count`` values of ``size`` payload bytes, flushed into SSTs, as drains leave them."""
    value = os.urandom(size + ENVELOPE)
    keys = [n.to_bytes(8, "big") for n in range(count)]
    for start in range(0, count, 64):
        batch, *_ = _build_batch([(key, value) for key in keys[start : start + 64]], None)
        await db.write(batch)  # type: ignore[attr-defined]
    flush = sdb.FlushOptions(flush_type=sdb.FlushType.MEM_TABLE)
    await db.flush_with_options(flush)  # type: ignore[attr-defined]
    return keys


async def gets(db: object, keys: list[bytes], depth: int) -> tuple[float, float, float]:
    """Random gets at ``depth`` in flight: (calls/s, thread us/call, process us/call)."""
    order = iter(keys)
    get: Callable[[bytes], Awaitable[object]] = db.get  # type: ignore[attr-defined]

    async def one_at_a_time() -> None:
        for key in order:
            await get(key)

    before, start = clocks(), time.perf_counter()
    await asyncio.gather(*(one_at_a_time() for _ in range(depth)))
    wall, after = time.perf_counter() - start, clocks()
    thread, process = cpu_us(before, after, len(keys))
    return len(keys) / wall, thread, process


def puts(size: int, count: int) -> tuple[float, float]:
    """Building a batch of ``count`` puts of ``size``: (thread us/put, process us/put)."""
    value = os.urandom(size + ENVELOPE)
    items = [(n.to_bytes(8, "big") + b"\0\1", value) for n in range(count)]
    before = clocks()
    _build_batch(items, None)
    return cpu_us(before, clocks(), count)


async def flush_round(db: object, rounds: int) -> float:
    """One drain of a single page (a write) and a WAL flush, as a FLUSH costs: wall us."""
    value = os.urandom(PAGE + ENVELOPE)
    start = time.perf_counter()
    for n in range(rounds):
        batch, *_ = _build_batch([(n.to_bytes(8, "big") + b"\0\0", value)], None)
        await db.write(batch)  # type: ignore[attr-defined]
        await db.flush()  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / rounds * 1e6


def plugin_reads(seconds: float) -> tuple[float, float]:
    """nbdkit's Python plugin under fio's 4 KiB random reads at QD32, as in core_fio.py:
    (IOPS, nbdkit's CPU us per request)."""
    with tempfile.TemporaryDirectory() as tmp, serve("nbdkit-python", Path(tmp)) as server:
        fio(server.uri, "write", "1m", 8, None, REGION)
        cpu_before = _process_cpu(server.process.pid)
        start = time.perf_counter()
        iops = fio(server.uri, "randread", "4k", 32, seconds, REGION)["iops"]
        elapsed = time.perf_counter() - start
        cpu = _process_cpu(server.process.pid) - cpu_before
    return iops, cpu / (iops * elapsed) * 1e6


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def main_async(args: argparse.Namespace) -> None:
    db = await open_db()
    print(f"SlateDB binding alone, memory storage, daemon settings; load {os.getloadavg()[0]:.1f}")
    print("\nDb.get, random keys, values in SSTs")
    print("| value | in flight | gets/s | calling thread us/get | process us/get |")
    print("|---|---|---|---|---|")
    for size, count in ((BLOCK, args.blocks), (PAGE, args.blocks * 4)):
        keys = await fill(db, count, size)
        sample = [random.choice(keys) for _ in range(args.gets)]
        await gets(db, sample[: args.gets // 4], 4)  # warm the block cache's index part
        for depth in DEPTHS:
            rate, thread, process = await gets(db, sample, depth)
            print(f"| {size // 1024} KiB | {depth} | {rate:,.0f} | {thread:.0f} | {process:.0f} |")
    print("\nWriteBatch.put while building one batch (a drain's work per value)")
    print("| value | us/put (thread) |")
    print("|---|---|")
    for size in (PAGE, BLOCK):
        thread, _ = puts(size, 512)
        print(f"| {size // 1024} KiB | {thread:.1f} |")
    flush_us = await flush_round(db, 200)
    print(f"\nDb.write of one 4 KiB page, then Db.flush, memory storage: {flush_us:.0f} us")
    iops, cpu = plugin_reads(args.seconds)
    print(
        f"\nnbdkit Python plugin, fio 4k randread QD32 over 512 MiB: {iops:,.0f} IOPS "
        f"({1e6 / iops:.0f} us a request), {cpu:.0f} us of nbdkit's CPU per request"
    )
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"(this process's peak RSS {maxrss} MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2048, help="64 KiB values to store")
    parser.add_argument("--gets", type=int, default=6000, help="gets per figure")
    parser.add_argument("--seconds", type=float, default=5, help="the peer's fio job")
    args = parser.parse_args()
    try:
        asyncio.run(main_async(args))
    except subprocess.CalledProcessError as exc:
        print(f"binding_floor: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
