"""TraceRecorder, driven through the hook the NBD server calls."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from portalbd.trace import format
from portalbd.trace.format import OpType
from portalbd.trace.recorder import TraceRecorder


def test_records_every_field_in_order(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl.zst"
    rec = TraceRecorder.open(path, "unit", 1 << 30)
    base = time.monotonic_ns()
    rec.request_done(1, 1, 1, 4096, 8192, base + 10, 500, 0)  # Write FUA
    rec.request_done(1, 0, 0, 0, 512, base + 20, 40, 0)  # Read
    rec.request_done(2, 3, 0, 0, 0, base + 30, 9000, 0)  # Flush
    rec.request_done(2, 6, 2, 1 << 20, 1 << 16, base + 40, 70, 0)  # WriteZeroes NO_HOLE
    rec.request_done(2, 4, 0, 0, 4096, base + 50, 10, 22)  # Trim, EINVAL
    rec.close()
    rec.close()  # idempotent
    with format.TraceReader(path) as reader:
        assert reader.header.workload == "unit"
        assert reader.header.device_size_bytes == 1 << 30
        ops = list(reader.ops())
        assert reader.footer is not None and reader.footer.ops == 5
    assert [op.seq for op in ops] == [0, 1, 2, 3, 4]
    assert [op.type for op in ops] == [
        OpType.Write, OpType.Read, OpType.Flush, OpType.WriteZeroes, OpType.Trim,
    ]  # fmt: skip
    assert [(op.conn, op.offset, op.length, op.flags) for op in ops] == [
        (1, 4096, 8192, 1), (1, 0, 512, 0), (2, 0, 0, 0), (2, 1 << 20, 1 << 16, 2), (2, 0, 4096, 0),
    ]  # fmt: skip
    assert [op.duration_ns for op in ops] == [500, 40, 9000, 70, 10]
    assert [op.error for op in ops] == [0, 0, 0, 0, 22]
    ts = [op.ts_ns for op in ops]
    assert ts == sorted(ts) and all(b - a == 10 for a, b in itertools.pairwise(ts))


def test_request_done_after_close_is_ignored(tmp_path: Path) -> None:
    rec = TraceRecorder.open(tmp_path / "t.jsonl", "w", 1)
    rec.close()
    rec.request_done(1, 0, 0, 0, 512, time.monotonic_ns(), 1, 0)
    assert format.describe(tmp_path / "t.jsonl")["ops"] == 0


def test_unknown_commands_are_skipped_not_written(tmp_path: Path) -> None:
    rec = TraceRecorder.open(tmp_path / "t.jsonl", "w", 1)
    rec.request_done(1, 99, 0, 0, 0, time.monotonic_ns(), 1, 22)
    rec.request_done(1, 0, 0, 0, 512, time.monotonic_ns(), 1, 0)
    rec.close()
    assert rec.skipped == 1
    assert format.describe(tmp_path / "t.jsonl")["counts"] == {"Read": 1}


def test_memory_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    stream = format.open_write(path)
    # A writer that never wakes during the burst: the queue must stop growing.
    rec = TraceRecorder(stream, path, "burst", 1, max_pending=100, interval_s=3600)
    now = time.monotonic_ns()
    for i in range(250):
        rec.request_done(1, 1, 0, i * 512, 512, now, 1, 0)
    assert rec.dropped == 150
    rec.close()
    with format.TraceReader(path) as reader:
        assert len(list(reader.ops())) == 100
        assert reader.footer is not None and reader.footer.dropped == 150


def test_many_records_from_another_thread_stream_out(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    rec = TraceRecorder.open(path, "stream", 1 << 40)
    n = 200_000

    def feed() -> None:
        now = time.monotonic_ns()
        for i in range(n):
            rec.request_done(i % 4, i % 2, 0, i * 4096, 4096, now + i, 10, 0)

    t = threading.Thread(target=feed)
    t.start()
    t.join()
    rec.close()
    info = format.describe(path)
    assert info["ops"] + info["dropped"] == n
    assert info["dropped"] == 0
    assert info["connections"] == 4


def test_open_failure_is_an_oserror_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no-such-dir"):
        TraceRecorder.open(tmp_path / "no-such-dir" / "t.jsonl", "w", 1)


def test_write_failure_stops_recording_and_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"

    class Full:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, b: bytes) -> int:
            self.calls += 1
            if self.calls > 1:  # header fits, then the disk is full
                raise OSError(28, "No space left on device")
            return len(b)

        def close(self) -> None:
            pass

    rec = TraceRecorder(Full(), path, "full", 1, interval_s=0.001)  # type: ignore[arg-type]
    rec.request_done(1, 0, 0, 0, 512, time.monotonic_ns(), 1, 0)
    deadline = time.monotonic() + 10
    while rec.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rec.active
    assert isinstance(rec.error, OSError) and "No space left" in str(rec.error)
    rec.request_done(1, 0, 0, 0, 512, time.monotonic_ns(), 1, 0)  # no effect, no raise
    rec.close()


def test_trace_lines_are_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rec = TraceRecorder.open(path, 'quote " and \\ backslash', 7)
    rec.request_done(3, 7, 8, 0, 4096, time.monotonic_ns(), 5, 0)
    rec.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["workload"] == 'quote " and \\ backslash'
    assert lines[1]["type"] == "BlockStatus" and lines[1]["flags"] == 8
    assert lines[2]["end"] is True and lines[2]["ops"] == 1
