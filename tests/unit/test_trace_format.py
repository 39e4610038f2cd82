"""The trace file format: JSON lines (plain, gzip, zstd) and the original JSON."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from portalbd.trace import format
from portalbd.trace.cli import main
from portalbd.trace.format import OpType, TraceHeader, TraceOp

HEADER = TraceHeader(workload="unit", device_size_bytes=1 << 30, start_time="2026-01-01T00:00:00Z")


def sample_ops() -> list[TraceOp]:
    return [
        TraceOp(0, 0, 1, OpType.Write, 0, 4096, format.FLAG_FUA, 900, 0),
        TraceOp(1, 100, 1, OpType.Read, 4096, 512, 0, 300, 0),
        TraceOp(2, 200, 2, OpType.Flush, 0, 0, 0, 5000, 0),
        TraceOp(3, 300, 2, OpType.Trim, 8192, 1 << 20, 0, 50, 0),
        TraceOp(4, 400, 1, OpType.WriteZeroes, 65536, 65536, format.FLAG_NO_HOLE, 70, 0),
        TraceOp(5, 500, 1, OpType.Cache, 0, 4096, 0, 20, 0),
        TraceOp(6, 600, 1, OpType.BlockStatus, 0, 1 << 20, 0, 40, 0),
        TraceOp(7, 700, 1, OpType.Read, 1 << 29, 4096, 0, 10, 5),
    ]


# The original daemon's serde_json::to_writer_pretty output, written by hand.
ORIGINAL = """{
  "workload": "mkfs.ext4",
  "device_size_bytes": 1073741824,
  "start_time": "2025-06-01T12:00:00.123456789+00:00",
  "duration_ns": 2500000,
  "ops": [
    {
      "seq": 0,
      "timestamp_ns": 1000,
      "op": {
        "type": "Write",
        "offset": 0,
        "length": 4096
      },
      "duration_ns": 2000,
      "success": true
    },
    {
      "seq": 1,
      "timestamp_ns": 5000,
      "op": {
        "type": "Flush"
      },
      "duration_ns": 100000,
      "success": true
    },
    {
      "seq": 2,
      "timestamp_ns": 200000,
      "op": {
        "type": "Trim",
        "offset": 1048576,
        "length": 8388608
      },
      "duration_ns": 300,
      "success": false
    },
    {
      "seq": 3,
      "timestamp_ns": 300000,
      "op": {
        "type": "WriteZeroes",
        "offset": 4096,
        "length": 4096
      },
      "duration_ns": 300,
      "success": true
    },
    {
      "seq": 4,
      "timestamp_ns": 400000,
      "op": {
        "type": "Read",
        "offset": 0,
        "length": 512
      },
      "duration_ns": 300,
      "success": true
    }
  ]
}
"""


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.jsonl.zst"])
def test_round_trip_each_compression(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert format.write(path, HEADER, sample_ops()) == len(sample_ops())
    header, ops = format.load(path)
    assert header == HEADER
    assert ops == sample_ops()
    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw.startswith(format.GZIP_MAGIC)
    elif name.endswith(".zst"):
        assert raw.startswith(format.ZSTD_MAGIC)
    else:
        first = json.loads(raw.splitlines()[0])
        assert first["format"] == "portalbd-trace" and first["version"] == 1


def test_compression_detected_from_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.zst"
    format.write(path, HEADER, sample_ops())
    renamed = tmp_path / "plain-name.jsonl"
    path.rename(renamed)
    assert format.load(renamed)[1] == sample_ops()


def test_reader_restores_arrival_order(tmp_path: Path) -> None:
    # Completion order (as the recorder writes): the long request finishes last.
    ops = [
        TraceOp(0, 50, 1, OpType.Read, 0, 512, 0, 10, 0),
        TraceOp(1, 0, 1, OpType.Write, 0, 512, 0, 100, 0),
        TraceOp(2, 60, 1, OpType.Flush, 0, 0, 0, 10, 0),
    ]
    path = tmp_path / "t.jsonl"
    format.write(path, HEADER, ops)
    _, loaded = format.load(path)
    assert [op.seq for op in loaded] == [1, 0, 2]


def test_torn_last_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    format.write(path, HEADER, sample_ops())
    lines = path.read_text().splitlines()
    # Recorder killed mid-write: no footer, last record cut in half.
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    with format.TraceReader(path) as reader:
        ops = list(reader.ops())
        assert reader.footer is None
    assert ops == sample_ops()[:-1]


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad_version = tmp_path / "v2.jsonl"
    bad_version.write_text('{"format": "portalbd-trace", "version": 2}\n')
    with pytest.raises(format.TraceFormatError, match="version 2 is not supported"):
        format.load(bad_version)

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    with pytest.raises(format.TraceFormatError, match="neither a portalbd trace"):
        format.load(garbage)

    bad_op = tmp_path / "badop.jsonl"
    format.write(bad_op, HEADER, [])
    text = bad_op.read_text().splitlines()
    text.insert(1, '{"seq": 0, "ts_ns": 0, "type": "Frobnicate"}')
    bad_op.write_text("\n".join(text) + "\n")
    with pytest.raises(format.TraceFormatError, match=r"badop.jsonl:2: missing or unknown"):
        format.load(bad_op)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(format.TraceFormatError, match="empty file"):
        format.load(empty)


@pytest.mark.parametrize("compress", [False, True])
def test_original_format_imports(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / ("orig.json.gz" if compress else "orig.json")
    data = ORIGINAL.encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    header, ops = format.load_original(path)
    assert header.workload == "mkfs.ext4"
    assert header.device_size_bytes == 1 << 30
    assert [op.type for op in ops] == [
        OpType.Write, OpType.Flush, OpType.Trim, OpType.WriteZeroes, OpType.Read,
    ]  # fmt: skip
    assert ops[0] == TraceOp(0, 1000, 0, OpType.Write, 0, 4096, 0, 2000, 0)
    assert ops[2].offset == 1 << 20 and ops[2].length == 8 << 20 and not ops[2].success
    info = format.describe(path)
    assert info["format"] == "original" and info["ops"] == 5 and info["duration_ns"] == 2500000


def test_original_rejects_types_it_never_had(tmp_path: Path) -> None:
    path = tmp_path / "orig.json"
    path.write_text(ORIGINAL.replace('"type": "Flush"', '"type": "Cache"'))
    with pytest.raises(format.TraceFormatError, match=r"ops\[1\]: bad operation"):
        format.load_original(path)


def test_export_then_import_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl.zst"
    format.write(src, HEADER, sample_ops())
    dest = tmp_path / "orig.json"
    written, skipped = format.export_original(src, dest)
    assert (written, skipped) == (6, 2)  # Cache and BlockStatus have no original form
    doc = json.loads(dest.read_text())
    assert set(doc) == {"workload", "device_size_bytes", "start_time", "duration_ns", "ops"}
    assert doc["ops"][0] == {
        "seq": 0,
        "timestamp_ns": 0,
        "op": {"type": "Write", "offset": 0, "length": 4096},
        "duration_ns": 900,
        "success": True,
    }
    assert doc["ops"][2]["op"] == {"type": "Flush"}
    assert doc["ops"][-1]["success"] is False
    _, back = format.load_original(dest)
    kept = [op for op in sample_ops() if op.type in format.ORIGINAL_TYPES]
    assert [(o.type, o.offset, o.length, o.ts_ns) for o in back] == [
        (o.type, o.offset if o.type != OpType.Flush else 0, o.length, o.ts_ns) for o in kept
    ]


def test_cli_import_export_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orig = tmp_path / "orig.json"
    orig.write_text(ORIGINAL)
    out = tmp_path / "t.jsonl.zst"
    assert main(["import", str(orig), str(out)]) == 0
    # every op keeps its recorded duration, the trace its recorded total
    original = json.loads(ORIGINAL)
    with format.TraceReader(out) as reader:
        imported = list(reader.iter_ops())
        footer = reader.footer
    assert [o.duration_ns for o in imported] == [op["duration_ns"] for op in original["ops"]]
    assert footer is not None and footer.duration_ns == original["duration_ns"]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"] == 5 and info["counts"]["Write"] == 1 and info["complete"]
    assert main(["export", str(out), str(tmp_path / "back.json")]) == 0
    assert json.loads((tmp_path / "back.json").read_text())["workload"] == "mkfs.ext4"


def test_cli_info_is_for_people_unless_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orig = tmp_path / "orig.json"
    orig.write_text(ORIGINAL)
    out = tmp_path / "t.jsonl.zst"
    assert main(["import", str(orig), str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out} (jsonl, complete)"
    assert "  duration:   2.5 ms" in lines  # the recorded 2500000 ns
    assert "  disk size:  1.0 GiB" in lines
    assert "  workload:   mkfs.ext4" in lines
    assert any(line.split()[:2] == ["Write", "1"] and line.endswith("4.0 KiB") for line in lines)


def test_cli_reports_missing_and_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        main(["info", str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["info", str(bad)]) == 1
    assert "neither a portalbd trace" in capsys.readouterr().err
    jsonl = tmp_path / "t.jsonl"
    format.write(jsonl, HEADER, sample_ops())
    assert main(["import", str(jsonl), str(tmp_path / "x.jsonl")]) == 1
    assert "not an original one" in capsys.readouterr().err
