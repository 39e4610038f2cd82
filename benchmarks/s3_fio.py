"""portalbd on S3 against nbdkit's S3 plugin: same moto server, same fio jobs, one run.

Both targets store a 1 GiB disk in their own bucket of one ``moto_server``
(over HTTP on localhost, so the figures are the servers' own costs plus
moto's, not a network's). After a sequential prefill of the region, the jobs
of benchmarks/core_fio.py run for ``--runtime`` seconds each, in its order.
Around each read job the script counts the GET requests moto answered with
data (its request log, per bucket: SlateDB's own counters also count GETs
that its local object cache served) and prints GETs per MiB the client read: what a
read costs on a priced object store.

nbdkit's S3 plugin stores one object per ``--object-size`` (64 KiB by
default, portalbd's block size; nbdkit 1.32 refuses more than 64 KiB, the
plugin's minimum block size) and reads and writes whole objects. It refuses
smaller requests with EINVAL, so it runs behind nbdkit's blocksize filter,
which serves fio's 4 KiB jobs by read-modify-write of whole objects.

    .venv/bin/python benchmarks/s3_fio.py [--runtime S] [--region-mib N] [--object-size 64K]
        [--only portalbd,nbdkit-s3] [--config FILE] [--baseline DIR]

``--baseline DIR`` adds target ``baseline``: DIR's daemon (an earlier
checkout) on the same moto, for a before/after row in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.core_fio import JOBS, JOBS_IN_RUN_ORDER, MiB, Server, fio
from portalbd.launch import LaunchError, MotoServer, free_port, serving, start
from portalbd.trace.provenance import check_baseline, tree_env

DISK_GIB = 1
TARGETS = ("portalbd", "nbdkit-s3", "baseline")
DEFAULT_TARGETS = ("portalbd", "nbdkit-s3")


@contextlib.contextmanager
def serve(name: str, workdir: Path, moto: MotoServer, args: argparse.Namespace) -> Iterator[Server]:
    bucket = moto.create_bucket(bucket_of(name))
    port = free_port()
    if name in ("portalbd", "baseline"):
        extra = ("-c", str(args.config)) if args.config else ()
        env = moto.env()
        if name == "baseline":  # another checkout's daemon
            env = {**env, **tree_env(args.baseline)}
        daemon = start(
            workdir,
            *extra,
            storage_url=f"s3://{bucket}/disk",
            disk_size_gb=DISK_GIB,
            instance=name,
            port=port,
            env=env,
        )
        try:
            yield Server(name, daemon.process, daemon.uri)
        finally:
            with contextlib.suppress(LaunchError):
                daemon.stop(120)
        return
    env = moto.env()
    argv = [
        "nbdkit",
        "-f",
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        # The plugin refuses requests under its object size (EINVAL for fio's
        # 4 KiB jobs); the blocksize filter serves them by read-modify-write
        # of whole objects, as any client of it would need.
        "--filter=blocksize",
        "S3",
        f"endpoint-url={moto.endpoint}",
        f"access-key={env['AWS_ACCESS_KEY_ID']}",
        f"secret-key={env['AWS_SECRET_ACCESS_KEY']}",
        f"bucket={bucket}",
        "key=disk",
        f"size={DISK_GIB}G",
        f"object-size={args.object_size}",
        f"minblock={args.object_size}",
    ]
    with serving(argv, port, workdir / f"{name}.log", what=name) as process:
        yield Server(name, process, f"nbd://127.0.0.1:{port}")


def data_gets(moto: MotoServer, bucket: str) -> int:
    """GET requests of ``bucket`` that moto answered with data (200 or 206) so far."""
    assert moto.log_path is not None
    answered = re.compile(rf"GET /{re.escape(bucket)}/\S* HTTP/[0-9.]+\S*\" 20[06] ")
    with moto.log_path.open(errors="replace") as log:
        return sum(1 for line in log if answered.search(line))


def run(name: str, workdir: Path, moto: MotoServer, args: argparse.Namespace) -> dict[str, float]:
    region = args.region_mib * MiB
    results: dict[str, float] = {}
    with serve(name, workdir, moto, args) as server:
        fio(server.uri, "write", "1m", 8, None, region)
        # core_fio's order: the sequential write right after the prefill, not
        # behind the compaction of what the random writes just left
        for label, rw, bs, depth, unit in JOBS_IN_RUN_ORDER:
            before = data_gets(moto, bucket_of(name))
            try:
                figures = fio(server.uri, rw, bs, depth, args.runtime, region)
            except subprocess.CalledProcessError as exc:
                # a target that fails a job scores 0 for it; say why
                said = [ln.strip() for ln in f"{exc.stderr or ''}\n{exc.stdout or ''}".splitlines()]
                errors = [ln for ln in said if "error" in ln.lower()] or [ln for ln in said if ln]
                print(f"  {name:10} {label:14} failed: {(errors or ['?'])[0][:160]}")
                figures = {"iops": 0.0, "MiB/s": 0.0}
            results[label] = figures[unit]
            line = f"  {name:10} {label:14} {figures[unit]:10.1f} {unit}"
            if "read" in rw:
                gets = data_gets(moto, bucket_of(name)) - before
                read_mib = figures["MiB/s"] * args.runtime
                results[f"{label} GET/MiB"] = gets / read_mib if read_mib else 0.0
                line += f"   {gets} GETs, {results[f'{label} GET/MiB']:.2f} per MiB read"
            print(line, flush=True)
    return results


def bucket_of(name: str) -> str:
    return f"bench-{name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=15, help="seconds per fio job")
    parser.add_argument("--region-mib", type=int, default=256, help="MiB each job works over")
    parser.add_argument(
        "--object-size", default="64K", help="nbdkit S3 plugin's object size (at most 64K)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated targets of {', '.join(TARGETS)} (default: "
        f"{', '.join(DEFAULT_TARGETS)}, and baseline with --baseline)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a checkout of an earlier portalbd (git worktree add /tmp/before REV): "
        "target baseline runs its daemon on the same moto",
    )
    parser.add_argument("--config", type=Path, help="a portalbd config file for its run")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep its logs (default: a temp dir)",
    )
    args = parser.parse_args()
    if args.only is None:
        targets = [*DEFAULT_TARGETS, *(["baseline"] if args.baseline else [])]
    else:
        targets = [t for t in args.only.split(",") if t]
    if "baseline" in targets and args.baseline is None:
        parser.error("target baseline needs --baseline DIR")
    if args.baseline is not None:
        try:
            args.baseline = check_baseline(args.baseline)
        except LaunchError as exc:
            parser.error(str(exc))
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    table: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="portalbd-s3fio-"))
            )
        moto = MotoServer(workdir)
        try:
            for name in targets:
                table[name] = run(name, workdir, moto, args)
        finally:
            moto.stop()
    print(f"\nS3 (moto), {args.region_mib} MiB region, {args.runtime:g} s per job\n")
    compared = "portalbd" in targets and "nbdkit-s3" in targets
    ratio_head = " | portalbd / plugin |" if compared else " |"
    print("| job | " + " | ".join(targets) + ratio_head)
    print("|---" * (len(targets) + 1 + compared) + "|")
    ratios: list[float] = []
    for label, rw, *_rest, unit in JOBS:
        cells = []
        for t in targets:
            cell = f"{table[t][label]:.1f} {unit}"
            if "read" in rw:
                cell += f" ({table[t][f'{label} GET/MiB']:.1f} GET/MiB)"
            cells.append(cell)
        row = f"| {label} | " + " | ".join(cells)
        if compared:
            peer = table["nbdkit-s3"][label]
            ratio = table["portalbd"][label] / peer if peer else float("inf")
            ratios.append(ratio)
            row += f" | {ratio:.2f}x"
        print(row + " |")
    if ratios:
        finite = [r for r in ratios if r != float("inf")]
        if finite:
            print(f"\nmedian ratio over jobs the plugin served: {statistics.median(finite):.2f}x")
    if "portalbd" in targets and "baseline" in targets:
        print(
            "portalbd / baseline: "
            + "  ".join(
                f"{label}: {table['portalbd'][label] / table['baseline'][label]:.2f}x"
                if table["baseline"][label]
                else f"{label}: -"
                for label, *_ in JOBS
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
