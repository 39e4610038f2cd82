"""`bench --report`: colours per op, a panel per op, the daemon's settings and version.

The report is written from a bench document built from synthetic replay
outcomes (the figures code is the real one), and the SVG and HTML it
produces are parsed as a browser would get them.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from portalbd import __version__
from portalbd.trace import report, report_model, results
from portalbd.trace.format import OpType
from portalbd.trace.replay import ReplayResult

SVG = "{http://www.w3.org/2000/svg}"
MS = 1_000_000

# What `portalbd --print-config` gives (tomllib-parsed), trimmed; an older
# daemon has no io_threads.
SETTINGS: dict[str, Any] = {
    "log_level": "info",
    "device": {"block_size": 65536, "cache_bytes": 128 << 20, "dirty_bytes": 64 << 20,
               "io_threads": 2},
    "storage": {"url": "memory:///"},
    "lsm": {"flush_interval_ms": 100, "l0_sst_size_bytes": 64 << 20,
            "compression_codec": "none"},
}  # fmt: skip


def outcome(requests: list[tuple[OpType, int, int]]) -> ReplayResult:
    """A replay's outcome: (type, length, completion in ms), each taking 1 ms."""
    r = ReplayResult(elapsed_ns=max(t for _, _, t in requests) * MS + MS)
    for op, length, done_ms in requests:
        r.types.append(int(op))
        r.lengths.append(length)
        r.start_ns.append(done_ms * MS - MS)
        r.latency_ns.append(MS)
        r.errors.append(0)
    return r


def run_doc(label: str, r: ReplayResult, daemon: dict[str, Any] | None) -> dict[str, Any]:
    run: dict[str, Any] = {
        "trace": "traces/mkfs.jsonl.zst", "workload": "mkfs", "label": label,
        "config": {"storage": "memory", "block_size": None}, "iterations": 1, "warmup": 0,
        "store": None, "iteration_s": [r.elapsed_ns / 1e9], **results.summarize([r]),
    }  # fmt: skip
    if daemon is not None:
        run["daemon"] = daemon
    return run


def reads_writes(trim_gib: int) -> ReplayResult:
    """4 KiB reads and writes over 200 ms; one trim of `trim_gib` GiB in the middle."""
    requests = [(OpType.Read if i % 2 else OpType.Write, 4096, i) for i in range(1, 200)]
    requests += [(OpType.Flush, 0, 150)]
    if trim_gib:
        requests.append((OpType.Trim, trim_gib << 30, 100))
    return outcome(requests)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    daemon = {"side": "current", "tree": "/src/portalbd", "version": __version__,
              "commit": "abc1234567", "settings": SETTINGS}  # fmt: skip
    old_settings = {"device": {"block_size": 65536}, "storage": {"url": "file:///d"}}
    old = {"side": "baseline", "tree": "/src/before", "version": "0.0.9", "commit": None,
           "settings": old_settings}  # fmt: skip
    doc = {
        "schema": results.SCHEMA_ID, "created": "2026-12-02T05:00:00+00:00",
        "host": {"python": "3.12", "machine": "x86_64"},
        "portalbd": {"version": __version__, "commit": "abc1234567"},
        "baseline": {"tree": "/src/before", "commit": "0ld0ld0ld0"},
        "runs": [
            run_doc("memory (baseline)", reads_writes(0), old) | {"iterations": 3, "rounds": 3},
            run_doc("memory", reads_writes(8), daemon),
            run_doc("uri nbd://x", reads_writes(1), None),
        ],
    }  # fmt: skip
    results.validate(doc)
    out = tmp_path_factory.mktemp("report")
    report.write(doc, out)
    return out, doc


def op_colours(root: ET.Element) -> dict[str, set[str]]:
    """op name -> colours of the paths under its ``op-NAME`` (or ``op-NAME-i``) group."""
    found: dict[str, set[str]] = {}
    for g in root.iter(f"{SVG}g"):
        m = re.fullmatch(r"op-([A-Za-z]+)(-\d+)?", g.get("id") or "")
        if not m:
            continue
        for path in g.iter(f"{SVG}path"):
            style = path.get("style") or ""
            colours = re.findall(r"(?:stroke|fill): (#[0-9a-f]{6})", style)
            found.setdefault(m.group(1), set()).update(colours)
    return found


def test_each_op_has_one_colour_in_every_chart_and_table(
    written: tuple[Path, dict[str, Any]],
) -> None:
    out, doc = written
    svgs = sorted(out.glob("*.svg"))
    assert len(svgs) == 1 + 2 * len(doc["runs"])
    seen: dict[str, set[str]] = {}
    for svg in svgs:
        for op, colours in op_colours(ET.parse(svg).getroot()).items():
            seen.setdefault(op, set()).update(colours)
    assert set(seen) == {"Read", "Write", "Flush", "Trim"}
    for op, colours in seen.items():
        assert colours == {report_model.OP_COLOURS[op]}, op
    assert len(set(report_model.OP_COLOURS.values())) == len(report_model.OP_COLOURS)
    assert report_model.TOTAL_COLOUR not in report_model.OP_COLOURS.values()
    # the tables' swatches are the charts' colours
    swatches = re.findall(
        r'background:(#[0-9a-f]{6})" data-op="(\w+)"', (out / "index.html").read_text()
    )
    assert swatches and all(report_model.OP_COLOURS[op] == c for c, op in swatches)


def panel_ticks(svg: Path) -> dict[str, float]:
    """panel op -> the highest y tick label in that panel."""
    tops: dict[str, float] = {}
    for g in ET.parse(svg).getroot().iter(f"{SVG}g"):
        gid = g.get("id") or ""
        if gid.startswith("panel-"):
            numbers = []
            for text in g.iter(f"{SVG}text"):
                with_number = "".join(text.itertext()).strip()
                if re.fullmatch(r"[0-9.]+", with_number):
                    numbers.append(float(with_number))
            tops[gid.removeprefix("panel-")] = max(numbers)
    return tops


def test_a_trim_spike_gets_its_own_panel_and_does_not_flatten_reads(
    written: tuple[Path, dict[str, Any]],
) -> None:
    out, doc = written
    tops = panel_ticks(out / "run1-throughput.svg")
    assert list(tops) == ["Read", "Write", "Flush", "Trim"]
    trim_peak = max(doc["runs"][1]["timeline"]["mib_per_s"]["Trim"])
    read_peak = max(doc["runs"][1]["timeline"]["mib_per_s"]["Read"])
    assert trim_peak > 1000 * read_peak
    # each panel's scale fits its own op: the Read axis ends near the read rate
    assert read_peak <= tops["Read"] < 10 * read_peak
    assert tops["Trim"] >= trim_peak / 2
    # a run without trims has no Trim panel
    assert "Trim" not in panel_ticks(out / "run0-throughput.svg")
    # ops/s per op across runs: on a log axis, so Flush next to Write stays visible
    summary = (out / "summary.svg").read_text()
    assert 'id="ops-per-op"' in summary and "ops/s per op (log scale)" in summary
    assert "latency (us, log scale)" in (out / "run1-cdf.svg").read_text()


def test_the_report_says_which_portalbd_ran_and_with_which_settings(
    written: tuple[Path, dict[str, Any]],
) -> None:
    out, _doc = written
    page = (out / "index.html").read_text()
    assert f"portalbd-trace {__version__}, commit abc1234567" in page
    assert f"portalbd {__version__} (commit abc1234567, /src/portalbd)" in page
    assert "portalbd 0.0.9 [baseline] (/src/before)" in page
    for row in ("<th>storage</th><td>memory</td>", "<th>block size</th><td>64.0 KiB</td>",
                "<th>device cache</th><td>128.0 MiB</td>", "<th>io threads</th><td>2</td>",
                "<th>compression</th><td>none</td>",
                "<th>lsm.l0_sst_size_bytes</th><td>67108864</td>"):  # fmt: skip
        assert row in page, row
    # a baseline without io_threads does not get one made up; --uri: what was asked
    assert page.count("<th>io threads</th>") == 1
    assert "<th>storage</th><td>file</td>" in page
    assert "daemon settings: not reported" in page
    assert "1 measured iteration(s) after 0 warm-up, 0.20 s measured" in page
    assert "3 fresh daemons, each 1 measured iteration(s) after 0 warm-up" in page
    # the before/after table of the medians
    assert "baseline vs current" in page and "0ld0ld0ld0" in page


def test_key_settings_and_provenance_line() -> None:
    rows = dict(report_model.key_settings(SETTINGS))
    assert rows["block size"] == "64.0 KiB" and rows["io threads"] == "2"
    assert "SlateDB block cache" not in rows  # not in these settings: left out
    assert report_model.storage_kind("s3://bucket/prefix") == "s3"
    assert report_model.provenance_line(None) == "daemon: not reported"
    assert report_model.flatten({"a": {"b": None, "c": 1}}) == [("a.b", "-"), ("a.c", "1")]


def test_baseline_pairs_are_medians_and_speedup() -> None:
    def run(label: str, side: str, times: list[float]) -> dict[str, Any]:
        return {"trace": "t", "label": label, "iterations": len(times), "elapsed_s": sum(times),
                "total": {"ops": 100 * len(times)}, "iteration_s": times,
                "daemon": {"side": side}}  # fmt: skip

    doc = {"runs": [run("memory (baseline)", "baseline", [2.0, 9.0, 4.0]),
                    run("memory", "current", [1.0, 1.2, 30.0]),
                    run("file", "current", [1.0])]}  # fmt: skip
    (row,) = results.baseline_pairs(doc)  # "file" has no baseline: no row
    assert row["config"] == "memory" and row["ops"] == 100
    assert row["baseline"]["median_s"] == 4.0 and row["current"]["median_s"] == 1.2
    assert row["baseline"]["ops_per_s"] == 25.0
    assert row["speedup"] == pytest.approx(4.0 / 1.2, abs=1e-3)
