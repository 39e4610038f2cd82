"""What recording a trace costs.

1. The hook alone: nanoseconds per `TraceRecorder.request_done` call while the
   writer thread compresses in the background (zstd), against a tight loop.
2. End to end (needs the daemon): the same request-heavy replay against
   `portalbd` without and with `--trace`, alternating, best of N each; prints
   ops/s and the overhead in percent.  Target: under 10%.

    .venv/bin/python benchmarks/trace_recording_overhead.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from portalbd.trace import daemon_proc, format
from portalbd.trace.daemon_proc import DaemonConfig
from portalbd.trace.format import OpType, TraceOp
from portalbd.trace.recorder import TraceRecorder
from portalbd.trace.replay import replay


def hook_cost(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl.zst"
        # Room for every call: this measures the hook and the writer, not the drop path.
        rec = TraceRecorder(format.open_write(path), path, "bench", 1 << 30, max_pending=n + 1)
        now = time.monotonic_ns()
        t0 = time.perf_counter_ns()
        for i in range(n):
            rec.request_done(1, 1, 0, i * 4096, 4096, now, 1000, 0)
        t1 = time.perf_counter_ns()
        rec.close()
        t2 = time.perf_counter_ns()
        info = format.describe(path)
        print(
            f"hook: {(t1 - t0) / n:.0f} ns per request_done ({n} calls); "
            f"writer sustained {info['ops'] / ((t2 - t0) / 1e9):.0f} records/s; "
            f"{info['ops']} written, {info['dropped']} dropped, "
            f"{path.stat().st_size / n:.1f} bytes per record compressed"
        )


def workload(n: int, depth: int) -> list[TraceOp]:
    """4 KiB random reads and writes, `depth` in flight, on a 1 GiB device."""
    rnd = random.Random(7)
    ops = []
    for i in range(n):
        kind = OpType.Write if i % 2 == 0 else OpType.Read
        off = rnd.randrange(0, (1 << 30) // 4096) * 4096
        # Arrivals `depth` at a time, each batch after the previous completed.
        batch = i // depth
        ops.append(TraceOp(i, batch * 1000, 1, kind, off, 4096, 0, 900, 0))
    return ops


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (less disturbed by a busy machine than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_to_end(n: int, rounds: int, depth: int) -> None:
    if rounds < 1:
        return
    ops = workload(n, depth)
    rate: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            # Alternate which goes first so drift on a shared machine hits both.
            for tracing in (False, True) if r % 2 == 0 else (True, False):
                work = Path(tmp) / f"r{r}-{int(tracing)}"
                trace = work / "trace.jsonl.zst" if tracing else None
                work.mkdir()
                d = daemon_proc.start(
                    DaemonConfig(storage="memory"), work, 1 << 30, trace=trace, workload="bench"
                )
                try:
                    c0 = cpu_seconds(d.process.pid)
                    res = replay(d.uri, ops)
                    c1 = cpu_seconds(d.process.pid)
                finally:
                    d.stop()
                rate[tracing].append(n / (res.elapsed_ns / 1e9))
                cpu[tracing].append((c1 - c0) / n * 1e6)
                extra = ""
                if trace is not None:
                    info = format.describe(trace)
                    extra = f" ({info['ops']} recorded, {info['dropped']} dropped)"
                print(
                    f"round {r + 1} trace={'on ' if tracing else 'off'}: "
                    f"{rate[tracing][-1]:8.0f} ops/s, {cpu[tracing][-1]:6.1f} us daemon CPU "
                    f"per request{extra}"
                )
    med = {k: statistics.median(v) for k, v in rate.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"median of {rounds}: {med[False]:.0f} ops/s without, {med[True]:.0f} with recording "
        f"({(med[False] - med[True]) / med[False] * 100:+.1f}% throughput); daemon CPU per "
        f"request {mcpu[False]:.1f} us without, {mcpu[True]:.1f} us with "
        f"({(mcpu[True] - mcpu[False]) / mcpu[False] * 100:+.1f}%)"
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hook-calls", type=int, default=1_000_000)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--depth", type=int, default=16)
    args = p.parse_args()
    hook_cost(args.hook_calls)
    end_to_end(args.requests, args.rounds, args.depth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
