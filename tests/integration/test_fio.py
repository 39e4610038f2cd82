"""fio's NBD engine writes and verifies (crc32c) through several connections at once.

Each job has its own region (``offset_increment``) so the jobs' verify
headers never overwrite each other, and its own NBD connection, so the
daemon serves several clients pipelining at depth at the same time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon


def fio(uri: str, workdir: Path, *job: str, timeout: float = 300) -> dict[str, Any]:
    """Run one fio job over NBD; fail with fio's output if anything mismatched."""
    result = subprocess.run(
        [
            "fio",
            "--name=portalbd",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--output-format=json",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--group_reporting",
            *job,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,  # fio leaves its verify state files here
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start = result.stdout.index("{")
    report: dict[str, Any] = json.loads(result.stdout[start:])
    for job_report in report["jobs"]:
        assert job_report["error"] == 0, job_report
    return report


def total_bytes(report: dict[str, Any], direction: str) -> int:
    return sum(int(job[direction]["io_bytes"]) for job in report["jobs"])


@pytest.mark.parametrize(
    ("rw", "bs", "extra"),
    [
        ("randwrite", "4k", ["--iodepth=16"]),
        ("write", "1m", ["--iodepth=4"]),
        ("randwrite", "", ["--bsrange=512-128k", "--iodepth=8", "--norandommap"]),
    ],
    ids=["random-4k", "sequential-1m", "random-unaligned-sizes"],
)
def test_fio_verify_several_jobs(
    daemon: RunningDaemon, tmp_path: Path, rw: str, bs: str, extra: list[str]
) -> None:
    job = [
        f"--rw={rw}",
        "--numjobs=4",
        "--size=16m",
        "--offset_increment=16m",
        "--do_verify=1",
        *extra,
    ]
    if bs:
        job.append(f"--bs={bs}")
    if "--norandommap" in extra:
        # without a random map blocks may be written twice; verify the last write
        job += ["--verify_backlog=64", "--verify_state_save=0"]
    report = fio(daemon.uri, tmp_path, *job)
    assert total_bytes(report, "write") >= 4 * 16 * 2**20
    assert total_bytes(report, "read") > 0  # the verify pass read everything back


def test_fio_verify_survives_restart(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Data fio wrote is verified again by a new daemon on the same file storage."""
    url = f"file://{tmp_path}/data"
    job = [
        "--rw=randwrite",
        "--bs=8k",
        "--numjobs=2",
        "--size=8m",
        "--offset_increment=8m",
        "--iodepth=8",
        "--randseed=1234",
    ]
    first = daemon_factory(storage_url=url)
    fio(first.uri, tmp_path, *job, "--do_verify=1")
    assert first.stop() == 0
    second = daemon_factory(storage_url=url)
    report = fio(second.uri, tmp_path, *job, "--verify_only")
    assert total_bytes(report, "read") == 2 * 8 * 2**20


def test_fio_verify_notices_wrong_data(daemon: RunningDaemon, tmp_path: Path) -> None:
    """The check above is real: verifying a disk fio never wrote fails."""
    with pytest.raises(AssertionError, match="verify"):
        fio(daemon.uri, tmp_path, "--rw=write", "--bs=64k", "--size=1m", "--verify_only")
