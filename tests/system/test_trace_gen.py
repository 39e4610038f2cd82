"""Each workload generator end to end, shortened (`--quick`), recording with portalbd."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from portalbd.trace import format, gen
from portalbd.trace.cli import main
from portalbd.trace.gen import common as gen_common
from portalbd.trace.gen import minecraft as gen_minecraft
from tests.support.tools import run

pytestmark = pytest.mark.slow


def no_leftovers(workdir: Path) -> None:
    """Nothing of the run is still mounted or attached."""
    mounts = Path("/proc/mounts").read_text()
    assert str(workdir) not in mounts
    loops = run("losetup", "-a")
    assert str(workdir) not in loops


def check_trace(path: Path, workload: str, min_writes: int) -> dict[str, int]:
    info = format.describe(path)
    assert info["workload"] == workload
    assert info["complete"] and info["dropped"] == 0 and info["errors"] == 0
    counts: dict[str, int] = info["counts"]
    assert counts.get("Write", 0) >= min_writes
    assert counts.get("Flush", 0) > 0
    return counts


def test_gen_mkfs(tmp_path: Path) -> None:
    out = tmp_path / "mkfs.jsonl.zst"
    work = tmp_path / "work"
    assert main(["gen", "mkfs", "--quick", "--out", str(out), "--workdir", str(work)]) == 0
    counts = check_trace(out, "mkfs", 50)
    assert counts.get("Trim", 0) > 0  # both mkfs discard the device first
    no_leftovers(work)


def test_gen_pgbench(tmp_path: Path) -> None:
    out = tmp_path / "pgbench.jsonl.zst"
    work = tmp_path / "work"
    assert main(["gen", "pgbench", "--quick", "--out", str(out), "--workdir", str(work)]) == 0
    check_trace(out, "pgbench", 500)
    no_leftovers(work)


def test_gen_minecraft(tmp_path: Path) -> None:
    cached = (gen_minecraft.cache_dir() / "node_modules" / "mineflayer").is_dir()
    if shutil.which("node") is None or (not cached and shutil.which("npm") is None):
        pytest.skip("minecraft needs node and npm (or a cached node_modules)")
    out = tmp_path / "minecraft.jsonl.zst"
    work = tmp_path / "work"
    assert main(["gen", "minecraft", "--quick", "--out", str(out), "--workdir", str(work)]) == 0
    check_trace(out, "minecraft", 10)
    no_leftovers(work)


def test_failing_workload_still_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []

    def broken(ctx: gen_common.GenContext) -> None:
        gen_common.run(["mkfs.ext4", "-F", "-q", str(ctx.device)])
        with gen_common.mounted(ctx.device, ctx.workdir / "mnt"):
            seen.append(ctx.device)
            gen_common.run(["false"])

    monkeypatch.setattr(gen, "workloads", lambda: {"mkfs": (broken, 256 << 20)})
    work = tmp_path / "work"
    out = tmp_path / "x.jsonl"
    assert main(["gen", "mkfs", "--out", str(out), "--workdir", str(work)]) == 1
    assert "false failed with status 1" in capsys.readouterr().err
    assert seen
    no_leftovers(work)


def test_missing_tools_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["gen", "mkfs", "--quick", "--out", str(tmp_path / "t.jsonl")]) == 1
    assert "missing tools: nbdfuse" in capsys.readouterr().err


def test_gen_mkfs_with_the_kernel_client(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed")
    out = tmp_path / "kernel.jsonl.zst"
    argv = ["gen", "mkfs", "--client", "kernel", "--quick", "--out", str(out)]
    assert main(argv) == 0
    check_trace(out, "mkfs", 20)
    _, ops = format.load(out)
    assert len({op.conn for op in ops}) == 1  # nbd-client: one connection


def test_kernel_client_runs_only_mkfs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gen", "pgbench", "--client", "kernel", "--out", str(tmp_path / "t.jsonl")]
    assert main(argv) == 1
    assert "runs only the mkfs workload" in capsys.readouterr().err
