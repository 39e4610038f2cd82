"""The daemon's memory against its configured budgets while it is written.

Default settings, file storage in a temporary directory. Each round writes
its share of ``--gib`` through fio's nbd engine: most of it 1 MiB
sequential writes (depth 8) over the next stretch of the disk, the rest
4 KiB random writes (depth 32) anywhere on it. After every round: RSS,
its peak (VmHWM), how much of it is anonymous memory and in which kind of
mapping (the main heap, 64 MiB malloc arena heaps, other anonymous
mappings), and what the daemon counts in its own buffers; then again after
an NBD FLUSH and a few seconds (``--settle``), when the write-back buffer is
empty and the allocator has been trimmed: that second figure is the one to
compare across rounds, the first one moves with whatever was in flight. The
target is the budget total the daemon logs at start plus 100 MiB.

    .venv/bin/python benchmarks/memory.py [--gib 3] [--rounds 5] [--random-percent 5]
        [--settle S] [--env NAME=VALUE ...] [--probe | --tracemalloc] [-- daemon args ...]

``--env`` runs the daemon with extra environment (``MALLOC_MMAP_THRESHOLD_=32768``
to try allocator settings; ``PYTHONPATH=DIR`` to run another checkout's
daemon for a before/after table). ``--probe`` has the daemon report glibc's
malloc totals (bytes in use against bytes free but still mapped) after each
sample, and takes ``PROBE_TRIM_S`` and ``PROBE_ARENAS`` from ``--env`` to
try another trim interval or arena count; ``--tracemalloc`` adds the Python
allocations that hold the most memory (slow: a diagnosis, not a figure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from portalbd.control.client import ControlClient
from portalbd.launch import Daemon, LaunchError, start

MiB = 1 << 20
SLACK_MIB = 100  # interpreter, libraries, SlateDB's own working memory
ARENA_HEAP = 64 * MiB  # glibc's non-main arenas live in 64 MiB-aligned heaps
# The daemon under a probe: on SIGUSR2 it appends glibc's malloc totals
# (mallinfo2) and, under tracemalloc, its largest Python allocations to a
# file next to its log.
PROBE = """
import ctypes, signal, sys, tracemalloc
if sys.argv[2] == "trace":
    tracemalloc.start(8)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def dump(signum, frame):
    m = libc.mallinfo2()
    mib = 2**20
    lines = [f"malloc: in use {m.uordblks / mib:.0f} MiB in heaps + {m.hblkhd / mib:.0f} MiB "
             f"mmapped ({m.hblks} chunks); free in heaps {m.fordblks / mib:.0f} MiB of "
             f"{m.arena / mib:.0f} MiB"]
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("traceback")
        total = sum(s.size for s in stats)
        lines.append(f"python heap traced: {total / mib:.1f} MiB in {len(stats)} sites")
        for stat in stats[:10]:
            lines.append(f"{stat.size / mib:8.1f} MiB {stat.count:8d} blocks")
            lines.extend(f"        {line}" for line in stat.traceback.format()[-6:])
    with open(sys.argv[1], "a") as out:
        out.write("\\n".join(lines) + "\\n--\\n")
signal.signal(signal.SIGUSR2, dump)
import os
from portalbd import allocator
if os.environ.get("PROBE_TRIM_S"):
    allocator.TRIM_INTERVAL_S = float(os.environ["PROBE_TRIM_S"])
if os.environ.get("PROBE_ARENAS"):
    allocator.ARENAS = int(os.environ["PROBE_ARENAS"])
from portalbd.daemon import main
sys.exit(main(sys.argv[3:]))
"""


@dataclass
class Sample:
    label: str
    rss: int
    peak: int
    anon: int
    main_heap: int
    arena_heaps: int
    arena_count: int
    other_anon: int
    threads: int
    dirty: int
    cached: int
    seconds: float = 0.0
    cpu: float = 0.0

    def row(self) -> str:
        return (
            f"{self.label:>9} {self.rss / MiB:7.0f} {self.peak / MiB:6.0f} {self.anon / MiB:6.0f}"
            f" {self.main_heap / MiB:6.0f} {self.arena_heaps / MiB:6.0f} ({self.arena_count:2d})"
            f" {self.other_anon / MiB:6.0f} {self.threads:4d}"
            f" {self.dirty / MiB:6.0f} {self.cached / MiB:6.0f} {self.seconds:6.1f} {self.cpu:6.1f}"
        )


HEADER = (
    f"{'after':>9} {'RSS':>7} {'peak':>6} {'anon':>6} {'heap':>6} {'arenas':>11}"
    f" {'mmap':>6} {'thr':>4} {'dirty':>6} {'cache':>6} {'fio s':>6} {'cpu s':>6}"
)


def status_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU the daemon has used (steadier than wall time on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS, so each round shows its own peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def anonymous_mappings(pid: int) -> tuple[int, int, int, int]:
    """RSS of the main heap, of malloc arena heaps (and their count), of other anonymous maps.

    An arena heap is an anonymous mapping that starts on a 64 MiB boundary
    and is at most 64 MiB long (glibc reserves them so and trims their tail).
    """
    heap = arenas = count = other = 0
    start = end = 0
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$", line)
        if head:
            start, end = int(head[1], 16), int(head[2], 16)
            name = head[3]
            continue
        if not line.startswith("Rss:"):
            continue
        rss = int(line.split()[1]) * 1024
        if name == "[heap]":
            heap += rss
        elif name == "":
            if start % ARENA_HEAP == 0 and end - start <= ARENA_HEAP:
                arenas += rss
                count += 1
            else:
                other += rss
    return heap, arenas, count, other


def sample(label: str, daemon: Daemon, control: Path) -> Sample:
    pid = daemon.process.pid
    fields = status_kib(pid)
    heap, arenas, count, other = anonymous_mappings(pid)
    with ControlClient(control) as client:
        stats = client.request("Status")["Status"]["stats"]
    return Sample(
        label,
        rss=fields["VmRSS"],
        peak=fields["VmHWM"],
        anon=fields["RssAnon"],
        main_heap=heap,
        arena_heaps=arenas,
        arena_count=count,
        other_anon=other,
        threads=len(list(Path(f"/proc/{pid}/task").iterdir())),
        dirty=stats["dirty_bytes"],
        cached=stats["cached_bytes"],
    )


def fio(uri: str, rw: str, bs: str, depth: int, offset: int, size: int, seed: int) -> None:
    argv = [
        "fio",
        "--name=memory",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        f"--offset={offset}",
        f"--size={size}",
        f"--randseed={seed}",
    ]
    if rw == "randwrite":
        argv.append("--norandommap")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise SystemExit(f"fio {rw} failed: {result.stderr[-800:]}")


def budgets_line(daemon: Daemon) -> str:
    for _ in range(50):
        found = re.search(r"memory budgets (.*)", daemon.log())
        if found:
            return found[1]
        time.sleep(0.1)
    raise SystemExit("the daemon logged no memory budgets")


def budget_total(line: str) -> int:
    found = re.search(r"total=(\d+)MiB", line)
    if found is None:
        raise SystemExit(f"no total in the budget line: {line}")
    return int(found[1]) * MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=3, help="GiB written in all (and disk size)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--random-percent", type=int, default=5, help="share of 4 KiB writes")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--settle",
        type=float,
        default=6,
        help="after a round's sample, FLUSH and wait this long, then sample again (0: don't)",
    )
    parser.add_argument("--probe", action="store_true", help="print malloc totals per round")
    parser.add_argument("--tracemalloc", action="store_true", help="--probe, and Python's heap")
    parser.add_argument("daemon_args", nargs="*", help="after --: more daemon arguments")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    if "PYTHONPATH" in env:
        env.setdefault("PYTHONSAFEPATH", "1")  # -m would import the cwd's package first
    per_round = (args.gib << 30) // args.rounds // MiB * MiB
    random_bytes = per_round * args.random_percent // 100 // MiB * MiB
    seq_bytes = per_round - random_bytes
    disk = args.gib << 30
    with tempfile.TemporaryDirectory(prefix="portalbd-memory-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        probe: Path | None = None
        if args.probe or args.tracemalloc:
            probe = workdir / "probe.txt"
            script = workdir / "probe.py"
            script.write_text(PROBE)
            mode = "trace" if args.tracemalloc else "malloc"
            env["PORTALBD_BIN"] = f"{sys.executable} {script} {probe} {mode}"
        with _env(env):
            daemon = start(
                workdir,
                *args.daemon_args,
                storage_url=f"file://{workdir}/data",
                disk_size_gb=args.gib,
                instance="memory",
                env=env,
            )
        control = workdir / "memory.sock"
        try:
            line = budgets_line(daemon)
            target = budget_total(line) + SLACK_MIB * MiB
            print(f"budgets: {line}")
            print(f"target: RSS <= {target / MiB:.0f} MiB (budget total + {SLACK_MIB} MiB)")
            print(
                f"{args.rounds} rounds of {seq_bytes / MiB:.0f} MiB 1M sequential (QD8) +"
                f" {random_bytes / MiB:.0f} MiB 4k random (QD32) writes;"
                f" env {' '.join(args.env) or '(none)'}"
            )
            print(HEADER)
            samples = [sample("start", daemon, control)]
            print(samples[0].row(), flush=True)
            ask_probe(daemon, probe)
            written = 0
            settled: list[Sample] = []
            for r in range(args.rounds):
                offset = (r * seq_bytes) % disk
                began, cpu = time.monotonic(), cpu_seconds(daemon.process.pid)
                reset_peak(daemon.process.pid)
                fio(daemon.uri, "write", "1m", 8, offset, seq_bytes, r)
                if random_bytes:
                    fio(daemon.uri, "randwrite", "4k", 32, 0, random_bytes, 100 + r)
                written += seq_bytes + random_bytes
                seconds = time.monotonic() - began
                cpu = cpu_seconds(daemon.process.pid) - cpu
                now = sample(f"{written / MiB:.0f}M", daemon, control)
                now.seconds, now.cpu = seconds, cpu
                print(now.row(), flush=True)
                ask_probe(daemon, probe)
                if args.settle:
                    nbd_flush(daemon.uri)
                    time.sleep(args.settle)
                    settled.append(sample(f"+{args.settle:g}s", daemon, control))
                    print(settled[-1].row(), flush=True)
                    ask_probe(daemon, probe)
                samples.append(now)
            report("at the end of each round", samples[1:], target)
            if settled:
                report(f"after a FLUSH and {args.settle:g} s", settled, target)
        finally:
            with contextlib.suppress(LaunchError):
                daemon.stop(120)
    return 0


def ask_probe(daemon: Daemon, probe: Path | None) -> None:
    """Have the probed daemon write its malloc (and Python heap) figures; print them."""
    if probe is None:
        return
    before = probe.stat().st_size if probe.exists() else 0
    daemon.process.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = probe.read_text() if probe.exists() else ""
        if len(text) > before and text.endswith("--\n"):
            print("    " + text[before:].removesuffix("--\n").replace("\n", "\n    "))
            return
        time.sleep(0.2)
    print("    (the probe did not answer)")


def report(when: str, rounds: list[Sample], target: int) -> None:
    rss = [s.rss for s in rounds]
    spread = (max(rss) - min(rss)) / max(rss)
    peak = max(s.peak for s in rounds)
    cpu = sum(s.cpu for s in rounds)
    over = sum(r > target for r in rss)
    print(
        f"RSS {when}: {' '.join(f'{r / MiB:.0f}' for r in rss)} MiB; max {max(rss) / MiB:.0f}"
        f" (target {target / MiB:.0f}: {'within' if not over else f'{over} rounds OVER'});"
        f" spread {spread:.1%} ({'flat' if spread <= 0.05 else 'NOT flat'}, limit 5%);"
        f" peak {peak / MiB:.0f} MiB" + (f"; daemon CPU while writing {cpu:.0f} s" if cpu else "")
    )


def nbd_flush(uri: str) -> None:
    """One NBD FLUSH: the write-back buffer drained, the WAL durable."""
    import nbd  # libnbd's Python binding (a system package, as in the tests)

    handle = nbd.NBD()
    handle.connect_uri(uri)
    handle.flush()
    handle.shutdown()


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    """PORTALBD_BIN is read by the launcher, in this process: set it here."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    sys.exit(main())
