"""The daemon against real NBD clients: libnbd (the ``nbd`` module) and nbdinfo.

Every command and negotiation option a client can use is exercised here
through libnbd, which checks the server's replies strictly, and compared with
a plain bytearray model of the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon

BLOCK = 65536
MiB = 1 << 20


@contextlib.contextmanager
def client(
    uri: str,
    *,
    structured: bool = True,
    meta: bool = True,
    strict: bool = True,
    export: str | None = None,
) -> Iterator[Any]:
    """A libnbd handle, shut down (NBD_CMD_DISC) when the block ends."""
    handle = nbd.NBD()
    handle.set_request_structured_replies(structured)
    if meta:
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        handle.set_strict_mode(0)
    if export is not None:
        handle.set_export_name(export)
    handle.connect_uri(uri)
    try:
        yield handle
    finally:
        with contextlib.suppress(nbd.Error):
            handle.shutdown()
        del handle


def extents(handle: Any, length: int, offset: int) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, flags) triples."""
    found: list[tuple[int, int, int]] = []

    def callback(context: str, start: int, entries: list[int], error: Any) -> int:
        assert context == nbd.CONTEXT_BASE_ALLOCATION
        position = start
        for i in range(0, len(entries), 2):
            found.append((position, entries[i], entries[i + 1]))
            position += entries[i]
        return 0

    handle.block_status(length, offset, callback)
    return found


def nbdinfo(*args: str) -> str:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    result = subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_flags_and_block_sizes_advertised(daemon: RunningDaemon) -> None:
    with client(daemon.uri) as h:
        assert h.get_size() == 1 << 30
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        for flag in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero"):
            assert getattr(h, flag)(), flag
        assert h.can_fast_zero() and h.can_cache() and h.can_df()
        assert not h.is_read_only()
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == BLOCK
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB
    info = json.loads(nbdinfo("--json", daemon.uri))
    export = info["exports"][0]
    assert export["export-name"] == "portalbd"  # the canonical name (NBD_INFO_NAME)
    assert export["export-size"] == 1 << 30
    assert export["can_multi_conn"] and export["can_flush"] and export["can_fua"]
    assert export["can_trim"] and export["can_zero"] and export["can_fast_zero"]
    assert export["can_cache"] and export["can_df"] and not export["is_read_only"]
    assert export["block_size_preferred"] == BLOCK
    assert export["block_size_maximum"] == 64 * MiB


def test_block_size_option_changes_preferred_size(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--block-size", "4096")
    with client(d.uri) as h:
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096


def test_read_write_trim_zero_cache_match_a_model(daemon: RunningDaemon) -> None:
    """Unaligned edits of every kind across block edges, checked byte for byte."""
    size = 8 * BLOCK
    model = bytearray(size)

    def write(h: Any, offset: int, data: bytes, flags: int = 0) -> None:
        h.pwrite(data, offset, flags)
        model[offset : offset + len(data)] = data

    with client(daemon.uri) as h:
        write(h, 0, os.urandom(size))
        write(h, BLOCK - 100, b"\xaa" * 300)  # straddles a block edge
        write(h, 3 * BLOCK + 7, os.urandom(2 * BLOCK), nbd.CMD_FLAG_FUA)
        h.trim(BLOCK + 1000, 2 * BLOCK - 500)  # [2B-500, 3B+500): unaligned both ends
        # The spec lets trimmed bytes read back as old data or zeroes; the
        # whole block inside is discarded, the partial ends must be one or the
        # other, and nothing outside the range may change.
        got = h.pread(size, 0)
        assert got[: 2 * BLOCK - 500] == model[: 2 * BLOCK - 500]
        assert got[2 * BLOCK - 500 : 2 * BLOCK] in (model[2 * BLOCK - 500 : 2 * BLOCK], bytes(500))
        assert got[2 * BLOCK : 3 * BLOCK] == bytes(BLOCK)
        assert got[3 * BLOCK : 3 * BLOCK + 500] in (model[3 * BLOCK : 3 * BLOCK + 500], bytes(500))
        assert got[3 * BLOCK + 500 :] == model[3 * BLOCK + 500 :]
        model[:] = got  # what the trim left behind is now the reference
        h.zero(3 * BLOCK, 2 * BLOCK + 10)
        model[2 * BLOCK + 10 : 5 * BLOCK + 10] = bytes(3 * BLOCK)
        h.zero(123, 5 * BLOCK + 100, nbd.CMD_FLAG_NO_HOLE)
        model[5 * BLOCK + 100 : 5 * BLOCK + 223] = bytes(123)
        h.zero(BLOCK, 6 * BLOCK, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
        model[6 * BLOCK : 7 * BLOCK] = bytes(BLOCK)
        h.cache(4 * BLOCK, 0)
        h.flush()
        assert h.pread(size, 0) == model
        assert h.pread(1, size - 1) == model[-1:]
        assert h.pread(17, 0) == model[:17]


def test_block_status_libnbd_and_nbdinfo_map(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("--size-bytes", str(64 * MiB), disk_size_gb=None)
    with client(daemon.uri) as h:
        h.pwrite(b"x" * BLOCK, 2 * BLOCK)
        h.pwrite(b"y" * 10, 4 * BLOCK + 5)
        h.pwrite(b"z" * BLOCK, 5 * BLOCK)
        h.zero(BLOCK, 5 * BLOCK)  # whole block zeroed: a hole again
        found = extents(h, 8 * BLOCK, 0)
    hole_zero = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert found[0] == (0, 2 * BLOCK, hole_zero)
    assert found[1] == (2 * BLOCK, BLOCK, 0)
    assert found[2] == (3 * BLOCK, BLOCK, hole_zero)
    assert found[3] == (4 * BLOCK, BLOCK, 0)
    assert found[4][0] == 5 * BLOCK and found[4][2] == hole_zero
    mapping = json.loads(nbdinfo("--map", "--json", daemon.uri))
    data = [(e["offset"], e["length"]) for e in mapping if e["type"] == 0]
    assert data == [(2 * BLOCK, BLOCK), (4 * BLOCK, BLOCK)]
    total = sum(e["length"] for e in mapping)
    assert total == 64 * MiB
    text = nbdinfo("--map", daemon.uri)
    assert "hole,zero" in text and "data" in text


def test_structured_replies_off(daemon: RunningDaemon) -> None:
    """Old-style (simple) replies still carry data and errors correctly."""
    with client(daemon.uri, structured=False, strict=False) as h:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"simple" * 1000, 12345)
        assert h.pread(6000, 12345) == b"simple" * 1000
        with pytest.raises(nbd.Error) as raised:
            h.pread(10, h.get_size() - 5)
        assert raised.value.errno == "EINVAL"
        # the connection is still usable after the error
        assert h.pread(6, 12345) == b"simple"


def test_structured_read_error_reply(daemon: RunningDaemon) -> None:
    with client(daemon.uri, strict=False) as h:
        with pytest.raises(nbd.Error) as raised:
            h.pread(4096, h.get_size())
        assert raised.value.errno == "EINVAL"
        with pytest.raises(nbd.Error) as raised:
            h.pwrite(b"x" * 10, h.get_size() - 5)
        assert raised.value.errno == "ENOSPC"
        with pytest.raises(nbd.Error) as raised:
            h.trim(BLOCK, h.get_size())
        assert raised.value.errno == "ENOSPC"
        assert h.pread(3, 0) == bytes(3)


def test_list_exports(daemon: RunningDaemon) -> None:
    listing = json.loads(nbdinfo("--list", "--json", daemon.uri))
    names = [e["export-name"] for e in listing["exports"]]
    assert names == ["portalbd"]
    assert listing["exports"][0]["export-size"] == 1 << 30


def test_named_default_and_empty_export(daemon: RunningDaemon) -> None:
    for name in ("portalbd", ""):
        with client(daemon.uri, export=name) as h:
            assert h.get_size() == 1 << 30
            h.pwrite(name.encode() or b"-", 0)


def test_unknown_export_name_is_refused(daemon: RunningDaemon) -> None:
    handle = nbd.NBD()
    with pytest.raises(nbd.Error) as raised:
        handle.connect_uri(daemon.uri + "/no-such-export")
    # NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT
    assert "no export named 'no-such-export'" in str(raised.value)
    assert raised.value.errno == "ENOENT"
    # the server keeps going
    with client(daemon.uri) as h:
        assert h.get_size() == 1 << 30


def test_export_name_option(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--export-name", "disk7")
    listing = json.loads(nbdinfo("--list", "--json", d.uri))
    assert [e["export-name"] for e in listing["exports"]] == ["disk7"]
    with client(d.uri + "/disk7") as h:
        assert h.get_size() == 1 << 30
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(d.uri + "/portalbd")


def test_unix_socket_listener(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "nbd.sock"
    d = daemon_factory("--nbd-socket", str(path))
    with client(f"nbd+unix:///?socket={path}") as h:
        h.pwrite(b"over unix", 0)
    with client(d.uri) as h:
        assert h.pread(9, 0) == b"over unix"


def test_pipelining_many_requests_in_flight(daemon: RunningDaemon) -> None:
    """Hundreds of aio requests at once on one connection, all answered right."""
    count, size = 400, 4096
    with client(daemon.uri) as h:
        chunks = [os.urandom(size) for _ in range(count)]
        cookies = [h.aio_pwrite(chunks[i], i * 3 * size) for i in range(count)]
        assert h.aio_in_flight() > 1
        while h.aio_in_flight():
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        buffers = [nbd.Buffer(size) for _ in range(count)]
        reads = [h.aio_pread(buffers[i], i * 3 * size) for i in range(count)]
        reads.append(h.aio_flush())
        while h.aio_in_flight():
            h.poll(-1)
        for cookie in reads:
            assert h.aio_command_completed(cookie)
        for i in range(count):
            assert buffers[i].to_bytearray() == chunks[i], i


def test_multi_conn_flush_persists_writes_of_other_connections(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """CAN_MULTI_CONN: one connection's FLUSH covers what others had acknowledged."""
    url = f"file://{tmp_path}/data"
    d = daemon_factory("--flush-interval-ms", "0", storage_url=url)
    pieces = {i: os.urandom(BLOCK + 777) for i in range(3)}
    with client(d.uri) as a, client(d.uri) as b, client(d.uri) as c:
        a.pwrite(pieces[0], 0)
        b.pwrite(pieces[1], 10 * BLOCK + 3)
        c.pwrite(pieces[2], 20 * BLOCK + 5)
        a.flush()
        d.kill()  # no goodbye: only what the flush made durable survives
    again = daemon_factory(storage_url=url)
    with client(again.uri) as h:
        assert h.pread(len(pieces[0]), 0) == pieces[0]
        assert h.pread(len(pieces[1]), 10 * BLOCK + 3) == pieces[1]
        assert h.pread(len(pieces[2]), 20 * BLOCK + 5) == pieces[2]


def test_disconnect_flushes(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """NBD_CMD_DISC: the server flushes before closing, so a SIGKILL after it loses nothing."""
    url = f"file://{tmp_path}/data"
    d = daemon_factory("--flush-interval-ms", "0", storage_url=url)
    payload = os.urandom(3 * BLOCK)
    with client(d.uri) as h:
        h.pwrite(payload, 5 * BLOCK + 11)
    # libnbd's shutdown waits for the server to close, which it does after flushing
    d.kill()
    again = daemon_factory(storage_url=url)
    with client(again.uri) as h:
        assert h.pread(len(payload), 5 * BLOCK + 11) == payload


def test_fua_write_is_durable_without_flush(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/data"
    d = daemon_factory("--flush-interval-ms", "0", storage_url=url)
    payload = os.urandom(BLOCK // 2)
    h = nbd.NBD()
    h.connect_uri(d.uri)
    h.pwrite(payload, 7 * BLOCK + 1, nbd.CMD_FLAG_FUA)
    d.kill()
    del h
    again = daemon_factory(storage_url=url)
    with client(again.uri) as h2:
        assert h2.pread(len(payload), 7 * BLOCK + 1) == payload


def test_read_only_export_refuses_every_change(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """WRITE, WRITE_ZEROES and TRIM all get EPERM; the data stays (TRIM once discarded it)."""
    url = f"file://{tmp_path}/data"
    writable = daemon_factory(storage_url=url)
    payload = os.urandom(2 * BLOCK)
    with client(writable.uri) as h:
        h.pwrite(payload, 0)
    assert writable.stop() == 0
    d = daemon_factory("--read-only", storage_url=url)
    with client(d.uri, strict=False) as h:
        assert h.is_read_only()
        changes: list[tuple[str, tuple[Any, ...]]] = [
            ("pwrite", (b"x", 0)),
            ("trim", (BLOCK, 0)),
            ("zero", (BLOCK, BLOCK)),
            ("zero", (BLOCK, BLOCK, nbd.CMD_FLAG_FAST_ZERO)),
        ]
        for method, args in changes:
            with pytest.raises(nbd.Error) as raised:
                getattr(h, method)(*args)
            assert raised.value.errno == "EPERM", method
        h.flush()
        assert h.pread(len(payload), 0) == payload


def test_option_negotiation_step_by_step(daemon: RunningDaemon) -> None:
    """libnbd's opt mode: LIST, INFO (good and unknown name), LIST_META_CONTEXT, then GO."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(daemon.uri)
    names: list[str] = []

    def on_export(name: str, description: str) -> int:
        names.append(name)
        return 0

    def on_context(name: str) -> int:
        contexts.append(name)
        return 0

    h.opt_list(on_export)
    assert names == ["portalbd"]
    contexts: list[str] = []
    h.opt_list_meta_context(on_context)
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("portalbd")
    h.opt_info()
    assert h.get_size() == 1 << 30
    assert h.get_block_size(nbd.SIZE_PREFERRED) == BLOCK
    h.opt_go()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"negotiated", 0)
    assert h.pread(10, 0) == b"negotiated"
    h.shutdown()


def test_concurrent_partial_writes_to_shared_blocks(daemon: RunningDaemon) -> None:
    """Four connections write interleaved 4 KiB stripes of the same blocks at once."""
    stripe, blocks, writers = 4096, 8, 4
    stripes = blocks * BLOCK // stripe
    data = [os.urandom(stripe) for _ in range(stripes)]
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(client(daemon.uri)) for _ in range(writers)]
        for i in range(stripes):
            handles[i % writers].aio_pwrite(data[i], i * stripe)
        while any(h.aio_in_flight() for h in handles):
            for h in handles:
                if h.aio_in_flight():
                    h.poll(-1)
        handles[0].flush()
        got = handles[1].pread(blocks * BLOCK, 0)
    for i in range(stripes):
        assert got[i * stripe : (i + 1) * stripe] == data[i], f"stripe {i} lost"


def test_replies_of_loads_finishing_together_leave_in_fewer_writes(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Reads answered from the store complete in bursts; their replies are
    gathered until the loop has run what is ready and leave in one write, not
    one send() each (with no cache, every read here is a load). strace counts
    the daemon's writes that carry read data."""
    count, size = 64, 4096
    d = daemon_factory("--cache-bytes", "0")
    chunks = [os.urandom(size) for _ in range(count)]
    with client(d.uri) as h:
        for i in range(count):
            h.pwrite(chunks[i], i * BLOCK)
        h.flush()
    trace = tmp_path / "strace.txt"
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=write,writev,sendmsg,sendto",
            "-o",
            str(trace),
            "-p",
            str(d.process.pid),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # attached to every thread
        with client(d.uri) as h:
            buffers = [nbd.Buffer(size) for _ in range(count)]
            cookies = [h.aio_pread(buffers[i], i * BLOCK) for i in range(count)]
            while h.aio_in_flight():
                h.poll(-1)
            for cookie in cookies:
                assert h.aio_command_completed(cookie)
        time.sleep(0.5)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    assert [buffers[i].to_bytearray() for i in range(count)] == chunks
    # a reply carries 4 KiB of data; other writes (wakeups, the log) are small
    replies = []
    for line in trace.read_text().splitlines():
        _, equals, result = line.rpartition("= ")  # "<pid> writev(...) = 4124"
        written = result.split(maxsplit=1)[0] if equals and result.strip() else ""
        if written.isdigit() and int(written) >= size:
            replies.append(int(written))
    assert sum(replies) >= count * size, trace.read_text()
    assert len(replies) < count, f"{len(replies)} writes for {count} replies"
    assert d.status()["stats"]["device"]["cache_misses"] >= count
