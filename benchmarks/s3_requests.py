"""Object-store requests per GiB written: S3 (moto) and a local directory.

Runs the same fio jobs (sequential 1 MiB writes, random 64 KiB writes, one
flush at the end) against a fresh disk for each storage, pattern and L0 SST
size, then reads the request counts SlateDB recorded (``status`` ->
``stats.object_store``) and compares PUTs with the theoretical minimum:
one PUT per L0 SST (bytes written / SST size) plus one WAL object per
flush interval of write time.

    .venv/bin/python benchmarks/s3_requests.py [--mib 256] [--tuned-l0-mib 128]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portalbd.launch import MotoServer, start

MIB = 1024 * 1024
GIB = 1024 * MIB
FLUSH_INTERVAL_MS = 100  # portalbd's default [lsm] flush_interval_ms


def run_fio(uri: str, pattern: str, mib: int) -> float:
    rw, bs = ("write", "1m") if pattern == "sequential" else ("randwrite", "64k")
    started = time.monotonic()
    subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--size={mib}m",
            "--iodepth=16",
            "--end_fsync=1",
            "--randrepeat=0",
            "--norandommap",
            "--refill_buffers",
        ],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.monotonic() - started


def measure(
    workdir: Path, storage: str, moto: MotoServer | None, pattern: str, mib: int, l0_mib: int
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    config = workdir / f"{tag}.toml"
    config.write_text(
        f"[lsm]\nl0_sst_size_bytes = {l0_mib * MIB}\nmax_unflushed_bytes = {2 * l0_mib * MIB}\n"
    )
    env: dict[str, str] = {}
    if storage == "s3":
        assert moto is not None
        url = f"s3://{moto.create_bucket(f'bench-{tag}')}/disk"
        env = moto.env()
    else:
        url = f"file://{workdir}/{tag}"
    daemon = start(
        workdir, "-c", str(config), storage_url=url, disk_size_gb=4, instance=tag, env=env
    )
    try:
        before = daemon.status()["stats"]["object_store"]
        elapsed = run_fio(daemon.uri, pattern, mib)
        after = daemon.status()["stats"]["object_store"]
    finally:
        daemon.stop()
    counts = {k: after[k] - before[k] for k in after}
    per_gib = GIB / (mib * MIB)
    # Strict floor: every byte in an L0-sized SST, plus one object for the one flush.
    floor = math.ceil(mib / l0_mib) + 1
    # SlateDB's model: the SSTs plus one WAL object per flush interval of writing.
    model = math.ceil(mib / l0_mib) + math.ceil(elapsed * 1000 / FLUSH_INTERVAL_MS)
    return {
        "storage": storage,
        "pattern": pattern,
        "l0_mib": l0_mib,
        "seconds": elapsed,
        "put_per_gib": counts["put"] * per_gib,
        "get_per_gib": (counts["get"] + counts["head"]) * per_gib,
        "list_per_gib": counts["list"] * per_gib,
        "delete_per_gib": counts["delete"] * per_gib,
        "floor_per_gib": floor * per_gib,
        "model_per_gib": model * per_gib,
        "ratio": counts["put"] / floor,
        "wal_mib": counts["wal_bytes_put"] / MIB,
        "sst_mib": counts["sst_bytes_put"] / MIB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB written per run")
    parser.add_argument("--default-l0-mib", type=int, default=64)
    parser.add_argument("--tuned-l0-mib", type=int, default=128)
    parser.add_argument("--storage", choices=("s3", "file", "both"), default="both")
    args = parser.parse_args()
    storages = ["s3", "file"] if args.storage == "both" else [args.storage]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="portalbd-s3bench-") as tmp:
        workdir = Path(tmp)
        moto = MotoServer(workdir) if "s3" in storages else None
        try:
            for storage in storages:
                for l0 in (args.default_l0_mib, args.tuned_l0_mib):
                    for pattern in ("sequential", "random"):
                        row = measure(workdir, storage, moto, pattern, args.mib, l0)
                        rows.append(row)
                        print(
                            f"  {storage} {pattern} l0={l0}MiB: {row['seconds']:.1f}s",
                            file=sys.stderr,
                        )
        finally:
            if moto is not None:
                moto.stop()
    print(f"\nObject-store requests per GiB written ({args.mib} MiB per run, one final flush)\n")
    header = (
        "| storage | pattern | L0 SST | s | PUT/GiB | floor | PUT/floor | SST+WAL-interval model "
        "| GET+HEAD/GiB "
        "| LIST/GiB | DELETE/GiB | WAL MiB | SST MiB |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['storage']} | {r['pattern']} | {r['l0_mib']} MiB | {r['seconds']:.1f} "
            f"| {r['put_per_gib']:.0f} | {r['floor_per_gib']:.0f} | {r['ratio']:.2f} "
            f"| {r['model_per_gib']:.0f} "
            f"| {r['get_per_gib']:.0f} | {r['list_per_gib']:.0f} | {r['delete_per_gib']:.0f} "
            f"| {r['wal_mib']:.0f} | {r['sst_mib']:.0f} |"
        )
    print(
        "\nfloor = bytes / L0 SST size + 1 (the one flush); model = bytes / L0 SST size + "
        f"write seconds / flush interval ({FLUSH_INTERVAL_MS} ms), i.e. one WAL object per "
        "interval. All per GiB written. Counts are SlateDB's own request counters."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
