"""Recording in the real daemon (`--trace`, TraceStart/TraceStop) and replaying onto it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from portalbd.launch import Daemon
from portalbd.trace import daemon_proc, format
from portalbd.trace.daemon_proc import DaemonConfig
from portalbd.trace.format import FLAG_FUA, FLAG_NO_HOLE, OpType
from portalbd.trace.pattern import pattern_bytes
from portalbd.trace.replay import replay

SIZE = 64 << 20

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def portalbd(tmp_path: Path) -> Iterator[StartDaemon]:
    started: list[Daemon] = []

    def start(name: str, trace: Path | None = None, workload: str = "test") -> Daemon:
        d = daemon_proc.start(
            DaemonConfig(storage="memory", block_size=4096),
            tmp_path / name,
            SIZE,
            trace=trace,
            workload=workload,
        )
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def checksum(uri: str) -> str:
    h = connect(uri)
    digest = hashlib.sha256()
    for off in range(0, SIZE, 4 << 20):
        digest.update(h.pread(4 << 20, off))
    h.shutdown()
    return digest.hexdigest()


def recorded(path: Path) -> list[tuple[OpType, int, int, int]]:
    _, ops = format.load(path)
    return [(op.type, op.offset, op.length, op.flags) for op in ops if op.type != OpType.Disconnect]


def test_recording_captures_exactly_what_the_client_sent(
    portalbd: StartDaemon, tmp_path: Path
) -> None:
    trace = tmp_path / "exact.jsonl.zst"
    d = portalbd("exact", trace=trace, workload="exact")
    h = connect(d.uri)
    expected: list[tuple[OpType, int, int, int]] = []
    h.pwrite(pattern_bytes(0, 4096), 0, nbd.CMD_FLAG_FUA)
    expected.append((OpType.Write, 0, 4096, FLAG_FUA))
    h.pwrite(pattern_bytes(12345, 777), 12345)
    expected.append((OpType.Write, 12345, 777, 0))
    h.pread(512, 4096)
    expected.append((OpType.Read, 4096, 512, 0))
    h.flush()
    expected.append((OpType.Flush, 0, 0, 0))
    h.trim(65536, 1 << 20)
    expected.append((OpType.Trim, 1 << 20, 65536, 0))
    h.zero(8192, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
    expected.append((OpType.WriteZeroes, 2 << 20, 8192, FLAG_NO_HOLE))
    if h.can_cache():
        h.cache(4096, 0)
        expected.append((OpType.Cache, 0, 4096, 0))
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        h.block_status(1 << 20, 0, lambda *a: 0)
        expected.append((OpType.BlockStatus, 0, 1 << 20, 0))
    # Pipelined: arrival order is what the client sent, whatever order replies come in.
    bufs = [nbd.Buffer.from_bytearray(pattern_bytes(i << 16, 4096)) for i in range(8)]
    for i, buf in enumerate(bufs):
        h.aio_pwrite(buf, (8 - i) << 16)
        expected.append((OpType.Write, (8 - i) << 16, 4096, 0))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.shutdown()
    assert d.stop() == 0
    assert recorded(trace) == expected
    header, ops = format.load(trace)
    assert header.workload == "exact" and header.device_size_bytes == SIZE
    assert all(op.error == 0 and op.duration_ns > 0 for op in ops)
    assert len({op.conn for op in ops}) == 1


def client_workload(uri: str) -> None:
    h = connect(uri)
    for off, length in [(0, 4096), (4096, 65536), (1 << 20, 512), (3 << 20, 1 << 20)]:
        h.pwrite(pattern_bytes(off, length), off)
    h.pwrite(pattern_bytes(10 << 20, 12345), 10 << 20, nbd.CMD_FLAG_FUA)
    h.zero(4096, 3 << 20)
    h.trim(65536, 3 << 20)
    bufs = []
    for i in range(32):
        off = (20 << 20) + i * 65536
        bufs.append(nbd.Buffer.from_bytearray(pattern_bytes(off, 65536)))
        h.aio_pwrite(bufs[-1], off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.shutdown()


def test_replaying_a_recorded_write_trace_reproduces_the_disk(
    portalbd: StartDaemon, tmp_path: Path
) -> None:
    trace = tmp_path / "writes.jsonl.gz"
    original = portalbd("original", trace=trace)
    client_workload(original.uri)
    want = checksum(original.uri)
    assert original.stop() == 0

    fresh = portalbd("fresh")
    assert checksum(fresh.uri) != want
    _, ops = format.load(trace)
    result = replay(fresh.uri, ops)
    assert result.error_count == 0 and not result.skipped
    assert checksum(fresh.uri) == want


def test_trace_start_and_stop_over_the_control_socket(
    portalbd: StartDaemon, tmp_path: Path
) -> None:
    d = portalbd("control")
    assert d.control("TraceStop") == {"Error": "no trace is being recorded"}
    # Control clients record only into the instance's trace directory
    # (tests/integration/test_control_hardening.py has the refusals in detail).
    bad = d.control({"TraceStart": {"path": str(tmp_path / "missing-dir" / "t.jsonl")}})
    assert "Error" in bad and "outside this instance's trace directory" in bad["Error"]

    h = connect(d.uri)
    h.pwrite(b"\1" * 4096, 0)  # before recording: not in the trace
    trace = d.control_socket.parent / "traces" / "live.jsonl.zst"
    assert d.control({"TraceStart": {"path": trace.name, "workload": "live"}}) == "Ok"
    h.pwrite(b"\2" * 4096, 8192)
    h.flush()
    assert d.control("TraceStop") == "Ok"
    h.pread(4096, 0)  # after: not in the trace either
    h.shutdown()
    assert recorded(trace) == [(OpType.Write, 8192, 4096, 0), (OpType.Flush, 0, 0, 0)]
    assert format.describe(trace)["workload"] == "live"
