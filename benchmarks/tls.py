"""What NBD over TLS costs: the core fio jobs in plain text and over TLS.

One daemon on memory storage in ``--tls allow`` mode serves both, so the two
runs differ only in the connection: ``nbd://`` or ``nbds://`` (libnbd, via
fio's nbd engine, with a self-signed certificate made by ``openssl``). The
jobs are benchmarks/core_fio.py's: 4 KiB random read and write at depth 32,
1 MiB sequential write and read at depth 8, after a sequential prefill;
each runs twice per mode, interleaved, once the daemon is idle again.

    .venv/bin/python benchmarks/tls.py [--runtime S] [--region-mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.core_fio import JOBS, MiB, fio
from portalbd.launch import Daemon, start

GiB = 1 << 30


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, timeout: float = 60, idle: float = 0.05) -> None:
    """Wait until the daemon is idle (drains, SlateDB flushes and compaction
    after a job), so the next job is not charged for the last one's work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < idle * 0.5:
            return


def bytes_moved(daemon: Daemon) -> int:
    stats = daemon.status()["stats"]
    return int(stats["bytes_read"]) + int(stats["bytes_written"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=10, help="seconds per job")
    parser.add_argument("--region-mib", type=int, default=512, help="region each job covers")
    args = parser.parse_args()
    region = args.region_mib * MiB
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="portalbd-tls-bench-") as tmp:
        workdir = Path(tmp)
        cert, key = self_signed(workdir)
        daemon = start(
            workdir, "--tls-certificate", str(cert), "--tls-key", str(key), "--tls", "allow",
            instance="tls-bench",
        )  # fmt: skip
        try:
            # libnbd checks the certificate at the handshake only; not checking
            # it here changes nothing in the steady state measured.
            uris = {
                "plain": daemon.uri,
                "tls": f"nbds://127.0.0.1:{daemon.port}/?tls-verify-peer=false",
            }
            fio(daemon.uri, "write", "1m", 8, None, region)  # prefill: reads see data
            # Each job runs plain, TLS, TLS, plain (ABBA) and each mode keeps
            # its mean: on a shared machine load drifts, and this cancels a
            # steady drift instead of charging it to one mode.
            for mode in uris:
                results[mode] = {}
            for label, rw, bs, depth, unit in JOBS:
                runs: dict[str, list[float]] = {mode: [] for mode in uris}
                cpu: dict[str, list[float]] = {mode: [0.0, 0.0] for mode in uris}
                for mode in ("plain", "tls", "tls", "plain"):
                    settle(daemon.process.pid)
                    cpu_before, moved_before = cpu_seconds(daemon.process.pid), bytes_moved(daemon)
                    runs[mode].append(fio(uris[mode], rw, bs, depth, args.runtime, region)[unit])
                    cpu[mode][0] += cpu_seconds(daemon.process.pid) - cpu_before
                    cpu[mode][1] += bytes_moved(daemon) - moved_before
                for mode, values in runs.items():
                    results[mode][label] = sum(values) / len(values)
                    # The daemon's CPU per GiB served: what TLS costs, and far
                    # less noisy than throughput on a busy machine.
                    per_gib = cpu[mode][0] / (cpu[mode][1] / GiB) if cpu[mode][1] else 0.0
                    results[mode][f"{label} cpu s/GiB"] = per_gib
                    shown = ", ".join(f"{v:.0f}" for v in values)
                    print(
                        f"  {mode:6} {label:14} {results[mode][label]:10.0f} {unit} ({shown})"
                        f"  daemon CPU {per_gib:.2f} s/GiB",
                        flush=True,
                    )
        finally:
            daemon.stop(120)
    print(
        "\n| job | plain | TLS | TLS / plain | daemon CPU s/GiB plain | TLS | TLS / plain |"
        "\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for label, _rw, _bs, _depth, unit in JOBS:
        plain, tls = results["plain"][label], results["tls"][label]
        cpu_plain = results["plain"][f"{label} cpu s/GiB"]
        cpu_tls = results["tls"][f"{label} cpu s/GiB"]
        print(
            f"| {label} | {plain:.0f} {unit} | {tls:.0f} {unit} | {tls / plain:.2f} "
            f"| {cpu_plain:.2f} | {cpu_tls:.2f} | {cpu_tls / cpu_plain:.2f} |"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
