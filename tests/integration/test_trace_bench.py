"""`portalbd-trace bench` on the shipped sample traces: runs, JSON validates, compares, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from portalbd import __version__
from portalbd.trace import format, provenance, results
from portalbd.trace.bench import Sweep
from portalbd.trace.cli import bench_options, build_parser, main, parse_size
from portalbd.trace.format import OpType, TraceHeader, TraceOp

TRACES = Path(__file__).resolve().parents[2] / "traces"


def sample(name: str) -> Path:
    path = TRACES / name
    assert path.exists(), f"sample trace {path} is missing (make it with portalbd-trace gen)"
    return path


def test_sample_traces_are_complete_and_small() -> None:
    paths = sorted(TRACES.glob("*.jsonl.zst"))
    assert {p.name.split(".")[0] for p in paths} >= {"mkfs", "pgbench", "minecraft"}
    assert sum(p.stat().st_size for p in paths) < 8 << 20
    for p in paths:
        info = format.describe(p)
        assert info["complete"] and info["ops"] > 0 and info["dropped"] == 0


def test_bench_smoke_on_a_sample_trace_json_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    report_dir = tmp_path / "report"
    rc = main([
        "bench", str(sample("mkfs.jsonl.zst")), "--iterations", "1", "--warmup", "0",
        "--block-size", "64K,256K", "--json-out", str(out), "--report", str(report_dir),
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert [r["config"]["block_size"] for r in doc["runs"]] == [65536, 262144]
    for run in doc["runs"]:
        assert run["workload"] == "mkfs"
        assert run["by_type"]["Write"]["ops"] > 0
        assert run["total"]["errors"] == 0
        assert run["store"] is not None and run["store"]["puts"] > 0
        # the daemon's own account of what it ran: its version and resolved settings
        daemon = run["daemon"]
        assert daemon["side"] == "current" and daemon["version"] == __version__
        assert daemon["settings"]["device"]["block_size"] == run["config"]["block_size"]
        assert daemon["settings"]["storage"]["url"] == "memory:///"
        assert "io_threads" in daemon["settings"]["device"]
    assert doc["portalbd"]["version"] == __version__
    err = capsys.readouterr().err
    assert "ops/s" in err and "p99.9" in err and "object store" in err
    index = (report_dir / "index.html").read_text()
    assert index.count("<img") == 1 + 2 * len(doc["runs"])
    assert "<th>block size</th><td>256.0 KiB</td>" in index
    assert f"portalbd {__version__}" in index and "<th>io threads</th>" in index
    assert (report_dir / "run0-cdf.svg").read_text().lstrip().startswith("<?xml")

    # A result compared with itself: every change is +0.0%.
    assert main(["bench", "--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert "Write" in table and "+0.0%" in table


def test_bench_json_schema_rejects_a_broken_document(tmp_path: Path) -> None:
    with pytest.raises(jsonschema.ValidationError):
        results.validate({"schema": results.SCHEMA_ID, "created": "x", "runs": [{"trace": 1}]})
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    with pytest.raises(SystemExit, match="OLD is not a bench result"):
        main(["bench", "--compare", str(bad), str(bad)])


def test_bench_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="give a TRACE or --all DIR"):
        main(["bench"])
    with pytest.raises(SystemExit, match="no traces"):
        main(["bench", "--all", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["bench", "x", "--storage", "floppy"])
    assert "storage must be memory, file or s3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "x", "--block-size", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        main(["bench", str(sample("minecraft.jsonl.zst")), "--rounds", "0"])
    with pytest.raises(SystemExit, match="--baseline starts daemons; not with --uri"):
        main(["bench", str(sample("minecraft.jsonl.zst")), "--baseline", str(tmp_path),
              "--uri", "nbd://127.0.0.1:1"])  # fmt: skip


def test_bench_baseline_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = str(sample("minecraft.jsonl.zst"))
    assert main(["bench", trace, "--baseline", str(tmp_path)]) == 1
    assert f"--baseline {tmp_path}: not a portalbd checkout" in capsys.readouterr().err
    # a checkout whose package does not import: it says what it would import instead
    (tmp_path / "portalbd").mkdir()
    (tmp_path / "portalbd" / "daemon.py").write_text("")
    assert main(["bench", trace, "--baseline", str(tmp_path)]) == 1
    assert "its daemon would import" in capsys.readouterr().err
    monkeypatch.setenv("PORTALBD_BIN", "portalbd")
    assert main(["bench", trace, "--baseline", str(provenance.HERE)]) == 1
    assert "unset PORTALBD_BIN" in capsys.readouterr().err


def test_bench_baseline_runs_the_other_checkouts_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the baseline: a copy of this package that says another version
    before = tmp_path / "before"
    shutil.copytree(provenance.HERE / "portalbd", before / "portalbd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    init = before / "portalbd" / "__init__.py"
    init.write_text(init.read_text().replace(__version__, "0.0.0+baseline"))
    trace = tmp_path / "t.jsonl"
    ops = [TraceOp(i, i * 100, 1, OpType.Write, i * 4096, 4096, 0, 50, 0) for i in range(20)]
    ops.append(TraceOp(20, 9999, 1, OpType.Flush, 0, 0, 0, 50, 0))
    format.write(trace, TraceHeader(workload="w", device_size_bytes=1 << 20, start_time=""), ops)
    out = tmp_path / "b.json"
    rc = main(["bench", str(trace), "--baseline", str(before), "--rounds", "2",
               "--iterations", "1", "--warmup", "0", "--json-out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert doc["baseline"]["tree"] == str(before.resolve())
    base, cur = doc["runs"]
    assert base["label"] == "memory (baseline)" and cur["label"] == "memory"
    assert base["daemon"]["version"] == "0.0.0+baseline"  # its Status: its package ran
    assert cur["daemon"]["version"] == __version__
    # commits as the bench started; the copy is no git checkout: none made up
    assert (
        cur["daemon"]["commit"] == doc["portalbd"]["commit"] == provenance.commit(provenance.HERE)
    )
    assert base["daemon"]["commit"] is None and doc["baseline"]["commit"] is None
    assert base["daemon"]["settings"]["device"]["block_size"] == 65536
    for run in (base, cur):
        assert len(run["iteration_s"]) == 2 and run["by_type"]["Write"]["ops"] == 40
    (pair,) = results.baseline_pairs(doc)
    assert pair["ops"] == 21 and pair["speedup"] > 0
    err = capsys.readouterr().err
    assert "baseline vs current" in err and "speedup" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # the original README's trace-bench command lines
        (
            ["--all", "target/traces/", "--iterations", "3", "--warmup", "1"],
            {"iterations": 3, "warmup": 1, "profile_dir": None, "connections": None},
        ),
        (
            ["t.json", "--profile", "--profile-dir", "target/profiles"],
            {"profile_dir": Path("target/profiles")},
        ),
        (["t.json", "-i", "2", "-C", "4"], {"iterations": 2, "connections": 4}),
        (["t.json", "--profile-dir", "p"], {"profile_dir": Path("p")}),
        (["t.json", "--profile"], {"profile_dir": Path("profiles")}),
    ],
)
def test_bench_takes_the_original_flags(argv: list[str], expected: dict[str, object]) -> None:
    options = bench_options(build_parser().parse_args(["bench", *argv]))
    for name, value in expected.items():
        assert getattr(options, name) == value, name


def test_sweep_is_the_cartesian_product() -> None:
    sweep = Sweep(storage=["memory", "file"], block_size=[4096, 65536], compression=["lz4"])
    configs = sweep.configs()
    assert len(configs) == 4
    assert configs[0].label() == "memory bs=4K comp=lz4"
    assert parse_size("256K") == 256 << 10 and parse_size("1MiB") == 1 << 20


def test_bench_profile_writes_a_flame_graph(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    rc = main([
        "bench", str(sample("minecraft.jsonl.zst")), "--iterations", "1", "--warmup", "0",
        "--profile", str(profiles),
    ])  # fmt: skip
    assert rc == 0
    svgs = list(profiles.glob("*.svg"))
    assert len(svgs) == 1 and "<svg" in svgs[0].read_text()


def test_bench_on_file_and_s3_storage(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    rc = main([
        "bench", str(sample("minecraft.jsonl.zst")), "--iterations", "1", "--warmup", "0",
        "--storage", "file,s3", "--json-out", str(out),
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert [r["config"]["storage"] for r in doc["runs"]] == ["file", "s3"]
    assert all(r["store"]["puts"] > 0 and r["total"]["errors"] == 0 for r in doc["runs"])
