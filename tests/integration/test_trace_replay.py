"""Replaying traces with libnbd against a real NBD server (nbdkit memory)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from portalbd.launch import free_port, spawn, stop_process, wait_for_port
from portalbd.trace import format, nbdkit_log
from portalbd.trace.cli import main
from portalbd.trace.format import OpType, TraceHeader, TraceOp
from portalbd.trace.pattern import pattern_bytes
from portalbd.trace.replay import ReplayError, ReplayOptions, _dependencies, replay

SIZE = 64 << 20

NbdkitFactory = Callable[..., str]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[NbdkitFactory]:
    """Starts `nbdkit memory` servers (optionally logging requests); stops them all."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(size: int = SIZE, logfile: Path | None = None) -> str:
        port = free_port()
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port)]
        if logfile is not None:
            cmd += ["--filter=log"]
        cmd += ["memory", str(size)]
        if logfile is not None:
            cmd += [f"logfile={logfile}"]
        p = spawn(cmd, None)
        procs.append(p)
        wait_for_port(port, p, 30, "nbdkit")
        return f"nbd://127.0.0.1:{port}"

    yield start
    for p in procs:
        stop_process(p, 30, "nbdkit")


def checksum(uri: str) -> str:
    h = nbd.NBD()
    h.connect_uri(uri)
    digest = hashlib.sha256()
    size = h.get_size()
    for off in range(0, size, 4 << 20):
        digest.update(h.pread(min(4 << 20, size - off), off))
    h.shutdown()
    return digest.hexdigest()


def client_workload(uri: str) -> None:
    """Writes, zeroes and trims from a real libnbd client, with pipelining."""
    h = nbd.NBD()
    h.connect_uri(uri)
    writes = [(0, 4096), (4096, 65536), (1 << 20, 512), (3 << 20, 1 << 20), (10 << 20, 12345)]
    for off, length in writes:
        h.pwrite(pattern_bytes(off, length), off)
    h.pwrite(pattern_bytes(2 << 20, 8192), 2 << 20, nbd.CMD_FLAG_FUA)
    h.zero(4096, 3 << 20)
    h.trim(65536, 3 << 20)  # nbdkit memory trims to zeroes
    # Several writes in flight at once on one connection.
    bufs = []
    for i in range(16):
        off = (20 << 20) + i * 65536
        buf = nbd.Buffer.from_bytearray(pattern_bytes(off, 65536))
        bufs.append(buf)
        h.aio_pwrite(buf, off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.pread(4096, 0)
    h.shutdown()


def test_replay_of_recorded_writes_reproduces_the_disk(
    nbdkit: NbdkitFactory, tmp_path: Path
) -> None:
    log = tmp_path / "requests.log"
    original = nbdkit(logfile=log)
    client_workload(original)
    want = checksum(original)
    trace = tmp_path / "client.jsonl.zst"
    nbdkit_log.to_trace(log, trace, "client", SIZE)

    _header, ops = format.load(trace)
    kinds = [op.type for op in ops]
    assert kinds.count(OpType.Write) == 5 + 1 + 16
    assert OpType.WriteZeroes in kinds and OpType.Trim in kinds and OpType.Flush in kinds
    fua = [op for op in ops if op.type == OpType.Write and op.flags & format.FLAG_FUA]
    assert [(op.offset, op.length) for op in fua] == [(2 << 20, 8192)]

    fresh = nbdkit()
    assert checksum(fresh) != want
    result = replay(fresh, ops)
    assert result.error_count == 0 and not result.skipped
    assert checksum(fresh) == want


def test_recorded_concurrency_is_kept(nbdkit: NbdkitFactory) -> None:
    # Ten overlapping writes, then a flush that arrived after they all finished,
    # then a read that arrived after the flush finished.
    ops = [TraceOp(i, i * 10, 1, OpType.Write, i * 4096, 4096, 0, 1000, 0) for i in range(10)]
    ops.append(TraceOp(10, 5000, 1, OpType.Flush, 0, 0, 0, 100, 0))
    ops.append(TraceOp(11, 6000, 1, OpType.Read, 0, 4096, 0, 100, 0))
    need, _by_end = _dependencies(ops)
    assert list(need) == [0] * 10 + [10, 11]
    result = replay(nbdkit(), ops)
    assert result.max_inflight_seen == 10
    done = [s + lat for s, lat in zip(result.start_ns, result.latency_ns, strict=True)]
    assert result.start_ns[10] >= max(done[:10])
    assert result.start_ns[11] >= done[10]


def test_speed_keeps_recorded_timing(nbdkit: NbdkitFactory) -> None:
    ops = [TraceOp(i, i * 20_000_000, 1, OpType.Read, 0, 512, 0, 1000, 0) for i in range(6)]
    result = replay(nbdkit(), ops, ReplayOptions(speed=2.0))
    for op, start in zip(ops, result.start_ns, strict=True):
        assert start >= op.ts_ns / 2.0


def test_requests_beyond_the_device_are_skipped(nbdkit: NbdkitFactory) -> None:
    ops = [
        TraceOp(0, 0, 1, OpType.Write, SIZE - 4096, 4096, 0, 10, 0),
        TraceOp(1, 10, 1, OpType.Write, SIZE, 4096, 0, 10, 0),
    ]
    result = replay(nbdkit(), ops)
    assert result.skipped == {"beyond device end": 1}
    assert result.error_count == 0


def test_several_connections(nbdkit: NbdkitFactory) -> None:
    ops = [TraceOp(i, i, i % 3, OpType.Write, i * 512, 512, 0, 100, 0) for i in range(30)]
    assert replay(nbdkit(), ops).connections == 3
    assert replay(nbdkit(), ops, ReplayOptions(connections=1)).connections == 1


def test_unreachable_server_is_a_clear_error() -> None:
    port = free_port()
    ops = [TraceOp(0, 0, 1, OpType.Read, 0, 512, 0, 1, 0)]
    with pytest.raises(ReplayError, match=f"cannot connect to nbd://127.0.0.1:{port}"):
        replay(f"nbd://127.0.0.1:{port}", ops)


def test_cli_replay_json(
    nbdkit: NbdkitFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    ops = [TraceOp(i, i * 100, 1, OpType.Write, i * 4096, 4096, 0, 50, 0) for i in range(50)]
    ops.append(TraceOp(50, 99999, 1, OpType.Flush, 0, 0, 0, 50, 0))
    format.write(trace, TraceHeader(workload="w", device_size_bytes=SIZE, start_time=""), ops)
    uri = nbdkit()
    rc = main(["replay", str(trace), "--uri", uri, "-i", "2", "-C", "3", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert doc["by_type"]["Write"]["ops"] == 100
    assert doc["by_type"]["Write"]["mib_per_s"] > 0
    assert doc["by_type"]["Flush"]["ops"] == 2
    # a trace recorded on one connection is dealt over three (nbd-client -C 3)
    spread = replay(uri, format.load(trace)[1], ReplayOptions(connections=3))
    assert spread.connections == 3 and not any(e > 0 for e in spread.errors)

    port = free_port()
    assert main(["replay", str(trace), "--uri", f"nbd://127.0.0.1:{port}"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_buffers_are_reused_across_requests_and_replays(nbdkit: NbdkitFactory) -> None:
    """Debian's libnbd never frees a buffer given to aio_pwrite/aio_pread, so
    the replayer reuses its own: a pass of the pgbench trace used to leak
    every byte it wrote. Buffers in the pool number what was in flight at
    once, whatever the number of requests or passes, and data stays right."""
    from portalbd.trace import replay as replay_module

    size = 12288  # a length no other test uses, so the pool's count is this test's
    pool = replay_module._BUFFERS._free
    # waves of 4 overlapping writes (each arrives after the previous wave ended)
    ops = [
        TraceOp(i, (i // 4) * 100, 1, OpType.Write, i * size, size, 0, 10, 0) for i in range(200)
    ]
    ops.append(TraceOp(200, 100_000, 1, OpType.Read, 8 * size, size, 0, 10, 0))
    uri = nbdkit()
    for _ in range(3):
        result = replay(uri, ops)
        assert result.error_count == 0
        assert len(pool.get(size, [])) == 4
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(size, 57 * size) == pattern_bytes(57 * size, size)
    h.shutdown()
