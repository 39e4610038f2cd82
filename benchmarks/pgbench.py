"""PostgreSQL pgbench on ext4 over NBD: portalbd (file storage) against ``nbdkit memory``.

A database is the workload that leans hardest on durable flushes: every
commit fsyncs the WAL, which reaches the NBD server as a FLUSH, and portalbd
answers it only once every earlier write is durable in its object store. The
disk is exposed as a file with ``nbdfuse``, made a block device with
``losetup``, formatted ext4 and mounted; PostgreSQL runs there as the
``postgres`` user, ``pgbench -i`` loads the data (scale 10 by default) and
``pgbench -c 4 -T 20`` (TPC-B-like) runs against it. The same steps run over
``nbdkit memory`` (C, nothing durable) in the same run as the peer. Each
target runs ``--runs`` times, the targets alternating (and the first of each
round alternating too) so that load from others on a shared machine falls on
both; the table shows every run, the medians of tps, average latency and load
time, and portalbd's median tps as a fraction of the peer's. Needs root (loop
devices, mount) and Debian's ``postgresql``. With ``--baseline DIR`` (a
checkout of an earlier portalbd) the ``baseline-file`` target runs that
checkout's daemon the same way, for a before/after table in one run.

    .venv/bin/python benchmarks/pgbench.py [--scale N] [--clients N] [--jobs N] [--time S]
        [--disk-gib N] [--runs N] [--only NAME,...] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from portalbd.launch import LaunchError, free_port, serving, spawn, start, stop_process, wait_until
from portalbd.trace.provenance import check_baseline, tree_env

PG_USER = "postgres"
TARGETS = ["portalbd-file", "nbdkit-memory"]
# --baseline: a checkout whose daemon the baseline-file target runs
BASELINE: list[Path | None] = [None]


@dataclass
class Result:
    load_seconds: float = float("nan")
    tps: float = float("nan")
    latency_ms: float = float("nan")
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian keeps them versioned)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin: install Debian's postgresql")
    return found[-1]


def run(argv: list[str], timeout: float, user: str | None = None) -> str:
    """Run a command (as ``user`` via runuser if given); its stdout, or an error with its output."""
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv!r} exited with {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


@contextlib.contextmanager
def serve(name: str, disk_gib: int, workdir: Path) -> Iterator[str]:
    """Start one NBD target on a free port; yield its URI; stop it afterwards."""
    port = free_port()
    if name.startswith(("portalbd", "baseline")):
        storage = f"file://{workdir}/data-{port}" if name.endswith("-file") else None
        env = None
        if name.startswith("baseline"):
            assert BASELINE[0] is not None, "baseline targets need --baseline DIR"
            env = tree_env(BASELINE[0])
        daemon = start(
            workdir, storage_url=storage, disk_size_gb=disk_gib, instance=name, port=port, env=env
        )
        try:
            yield daemon.uri
        finally:
            with contextlib.suppress(LaunchError):
                daemon.stop(120)
    elif name == "nbdkit-memory":
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", f"{disk_gib}G"]
        with serving(argv, port, workdir / f"{name}.log", what=name):
            yield f"nbd://127.0.0.1:{port}"
    else:
        raise ValueError(f"unknown target {name}")


@contextlib.contextmanager
def fuse_file(uri: str, mountpoint: Path, log_path: Path) -> Iterator[Path]:
    """``nbdfuse MOUNTPOINT/disk URI``: the export as a regular file; unmounted afterwards."""
    mountpoint.mkdir()
    disk = mountpoint / "disk"
    process = spawn(["nbdfuse", str(disk), uri], log_path)
    try:
        wait_until(lambda: os.path.ismount(mountpoint) and disk.exists(), process, 30, "nbdfuse")
        yield disk
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, timeout=60)
        with contextlib.suppress(LaunchError):
            stop_process(process, 60, "nbdfuse")


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """``losetup -f --show PATH``; detached afterwards."""
    device = run(["losetup", "-f", "--show", str(path)], 60).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=60)


@contextlib.contextmanager
def ext4(device: str, mountpoint: Path) -> Iterator[Path]:
    """Format ``device`` ext4 (inode tables and journal now, not in the background); mount it."""
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            device,
        ],
        600,
    )
    mountpoint.mkdir()
    run(["mount", "-o", "noatime", device, str(mountpoint)], 60)
    try:
        yield mountpoint
    finally:
        for _ in range(10):
            umount = subprocess.run(["umount", str(mountpoint)], check=False, timeout=300)
            if umount.returncode == 0:
                break
            time.sleep(1)


@contextlib.contextmanager
def postgres(fs: Path, workdir: Path) -> Iterator[tuple[Path, int]]:
    """initdb on ``fs`` and start the server (Unix socket only); yield (socket dir, port)."""
    bindir = pg_bin()
    data = fs / "pgdata"
    sockdir = workdir / f"pgsock-{fs.parent.name}"
    for directory in (data, sockdir):
        directory.mkdir(mode=0o700)
        shutil.chown(directory, PG_USER, PG_USER)
    run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        ],
        600,
        PG_USER,
    )
    port = free_port()
    options = f"-k {sockdir} -p {port} -c listen_addresses=''"
    logfile = sockdir / "postgres.log"
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "300"]
    run([*pg_ctl, "-l", str(logfile), "-o", options, "start"], 360, PG_USER)
    try:
        yield sockdir, port
    finally:
        subprocess.run(
            ["runuser", "-u", PG_USER, "--", *pg_ctl, "-m", "fast", "stop"],
            check=False,
            capture_output=True,
            timeout=360,
        )


def pgbench(target: str, args: argparse.Namespace, workdir: Path) -> Result:
    """One target end to end: server, nbdfuse, loop, ext4, PostgreSQL, pgbench -i, pgbench."""
    bindir = pg_bin()
    result = Result()
    base = workdir / target
    base.mkdir()
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(serve(target, args.disk_gib, base))
        disk = stack.enter_context(fuse_file(uri, base / "fuse", base / "nbdfuse.log"))
        device = stack.enter_context(loop_device(disk))
        fs = stack.enter_context(ext4(device, base / "mnt"))
        sockdir, port = stack.enter_context(postgres(fs, workdir))
        common = ["-h", str(sockdir), "-p", str(port)]
        start = time.perf_counter()
        init = [str(bindir / "pgbench"), *common, "-i", "-q", "-s", str(args.scale), PG_USER]
        run(init, 1800, PG_USER)
        result.load_seconds = time.perf_counter() - start
        clients = ["-c", str(args.clients), "-j", str(args.jobs), "-T", str(args.time)]
        out = run([str(bindir / "pgbench"), *common, *clients, PG_USER], args.time + 600, PG_USER)
        tps = re.search(r"^tps = ([0-9.]+)", out, re.MULTILINE)
        latency = re.search(r"^latency average = ([0-9.]+) ms", out, re.MULTILINE)
        if tps is None:
            raise RuntimeError(f"no tps in pgbench output: {out}")
        result.tps = float(tps.group(1))
        if latency is not None:
            result.latency_ms = float(latency.group(1))
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(results: dict[str, list[Result]]) -> None:
    print()
    header = f"{'target':16}{'runs':>5}{'tps (median)':>14}{'latency ms':>12}{'load s':>9}"
    print(f"{header}  tps by run")
    medians: dict[str, float] = {}
    for name, runs in results.items():
        good = [r for r in runs if r.error is None]
        failed = [r for r in runs if r.error is not None]
        if not good:
            error = failed[0].error or ""
            print(f"{name:16}{len(runs):>5}{'failed':>14}  {error.splitlines()[0][:100]}")
            continue
        medians[name] = median([r.tps for r in good])
        by_run = " ".join(f"{r.tps:.0f}" if r.error is None else "failed" for r in runs)
        print(
            f"{name:16}{len(good):>5}{medians[name]:>14.1f}"
            f"{median([r.latency_ms for r in good]):>12.2f}"
            f"{median([r.load_seconds for r in good]):>9.1f}  {by_run}"
        )
    ours = [n for n in medians if n.startswith(("portalbd", "baseline"))]
    peers = [n for n in medians if n.startswith("nbdkit")]
    if ours and peers:
        print()
        for o in ours:
            for p in peers:
                print(f"{o} / {p}: median tps {medians[o] / medians[p]:.2f}x")


def one_run(target: str, args: argparse.Namespace, workdir: Path) -> Result:
    """One run of one target, its failure kept as a result rather than raised."""
    try:
        result = pgbench(target, args, workdir)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"  {target:16} failed: {exc}", flush=True)
        return Result(error=str(exc))
    load = os.getloadavg()
    print(
        f"  {target:16} {result.tps:10.1f} tps  latency {result.latency_ms:.2f} ms"
        f"  load {result.load_seconds:.1f} s  (load average {load[0]:.2f})",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (10 = ~160 MB)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c")
    parser.add_argument("--jobs", type=int, default=1, help="pgbench -j")
    parser.add_argument("--time", type=int, default=20, help="pgbench -T seconds")
    parser.add_argument("--disk-gib", type=int, default=4, help="disk size")
    parser.add_argument("--runs", type=int, default=3, help="runs per target, alternating")
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a checkout of an earlier portalbd (e.g. git worktree add /tmp/before REV): "
        "target baseline-file runs its daemon, for a before/after table in one run",
    )
    args = parser.parse_args()
    if args.baseline is not None:
        try:
            BASELINE[0] = check_baseline(args.baseline)
        except LaunchError as exc:
            parser.error(str(exc))
    elif "baseline" in args.only:
        parser.error("baseline-file needs --baseline DIR")
    if os.geteuid() != 0:
        print("needs root (losetup, mount)", file=sys.stderr)
        return 1
    for tool in ("nbdkit", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "runuser"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    bindir = pg_bin()
    version = run([str(bindir / "postgres"), "--version"], 60).strip()
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cpus: {os.cpu_count()}")
    print(
        f"{version}; pgbench -i -s {args.scale}, then -c {args.clients} -j {args.jobs}"
        f" -T {args.time}; ext4 on nbdfuse + loop, {args.disk_gib} GiB disk;"
        f" {args.runs} runs per target, alternating"
    )
    targets = args.only.split(",")
    results: dict[str, list[Result]] = {target: [] for target in targets}
    for round_number in range(args.runs):
        order = targets if round_number % 2 == 0 else targets[::-1]
        for target in order:
            with tempfile.TemporaryDirectory(prefix="portalbd-bench-", dir="/var/tmp") as tmp:
                workdir = Path(tmp)
                workdir.chmod(0o755)  # the postgres user reaches its data directory through it
                results[target].append(one_run(target, args, workdir))
    print_table(results)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 1 if any(r.error for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
