"""SIGKILL right after a FLUSH: everything flushed survives, nothing is half-applied.

Unaligned writes, trims and zeroes are made and flushed, then unflushed
partial-block writes follow and the daemon is killed at once. After a
restart every block the unflushed writes did not touch equals the flushed
model exactly, and every block they touched holds either its flushed image or
its image with the whole write applied, never part of one. The cycle repeats
on the same storage, so recovery after a recovery is checked too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import DaemonFactory
from tests.support import connected, nbd_handle

BLOCKS = 24
ROUNDS = 3


def flushed_edits(h: Any, model: bytearray, rng: random.Random, block: int) -> None:
    """Random edits across block edges, applied to the disk and the model."""
    size = len(model)
    for _ in range(40):
        offset = rng.randrange(size - 1)
        length = rng.randrange(1, min(size - offset, 3 * block) + 1)
        kind = rng.random()
        if kind < 0.6:
            data = rng.randbytes(length)
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[offset : offset + length] = data
        elif kind < 0.8:
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
            h.zero(length, offset, flags)
            model[offset : offset + length] = bytes(length)
        else:
            # A trim may leave old bytes or zeroes; take what the disk says
            # now (read-your-writes) and require exactly that after the crash.
            h.trim(length, offset)
            got = h.pread(length, offset)
            for i, byte in enumerate(got):
                assert byte in (0, model[offset + i])
            model[offset : offset + length] = got
    assert h.pread(size, 0) == model


def unflushed_partial_writes(
    h: Any, model: bytearray, rng: random.Random, block: int
) -> dict[int, bytes]:
    """One write inside each of some blocks; returns each block's image with it applied."""
    after: dict[int, bytes] = {}
    for index in rng.sample(range(BLOCKS), BLOCKS // 2):
        start = rng.randrange(block - 1)
        length = rng.randrange(1, block - start + 1)
        data = rng.randbytes(length)
        h.pwrite(data, index * block + start)
        image = bytearray(model[index * block : (index + 1) * block])
        image[start : start + length] = data
        after[index] = bytes(image)
    return after


@pytest.mark.parametrize(
    ("block", "flush_interval_ms"), [(65536, 0), (4096, 100)], ids=["64k-manual", "4k-100ms"]
)
def test_sigkill_after_flush_keeps_flushed_and_never_half_applies(
    daemon_factory: DaemonFactory, tmp_path: Path, block: int, flush_interval_ms: int
) -> None:
    url = f"file://{tmp_path}/data"
    size = BLOCKS * block
    args = (
        "--size-bytes",
        str(size),
        "--block-size",
        str(block),
        "--flush-interval-ms",
        str(flush_interval_ms),
    )
    rng = random.Random(int(os.environ.get("PORTALBD_CRASH_SEED", "3")) + block)
    model = bytearray(size)
    for round_no in range(ROUNDS):
        d = daemon_factory(*args, storage_url=url, disk_size_gb=None)
        writer, flusher = nbd_handle(d.uri), nbd_handle(d.uri)
        assert writer.pread(size, 0) == model, f"round {round_no}: disk differs after restart"
        flushed_edits(writer, model, rng, block)
        flusher.flush()  # another connection's FLUSH covers these (CAN_MULTI_CONN)
        after = unflushed_partial_writes(writer, model, rng, block)
        d.kill()
        del writer, flusher

        d = daemon_factory(*args, storage_url=url, disk_size_gb=None)
        h = nbd_handle(d.uri)
        disk = h.pread(size, 0)
        h.shutdown()
        for index in range(BLOCKS):
            got = disk[index * block : (index + 1) * block]
            before = bytes(model[index * block : (index + 1) * block])
            if index not in after:
                assert got == before, f"round {round_no}: flushed block {index} changed"
            else:
                assert got in (before, after[index]), (
                    f"round {round_no}: block {index} holds part of an unflushed write"
                )
                model[index * block : (index + 1) * block] = got
        d.kill()  # the next round starts from this state; nothing was written since


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_flushes_unflushed_writes(
    daemon_factory: DaemonFactory, tmp_path: Path, signum: int
) -> None:
    """A clean stop makes every acknowledged write durable, with a client still connected."""
    url = f"file://{tmp_path}/data"
    d = daemon_factory("--flush-interval-ms", "0", storage_url=url)
    h = nbd_handle(d.uri)
    payload = os.urandom(5 * 65536 + 333)
    h.pwrite(payload, 12345)
    d.process.send_signal(signum)
    assert d.process.wait(60) == 0
    assert "shutdown complete flush=ok" in d.log()
    del h
    again = daemon_factory(storage_url=url)
    h = nbd_handle(again.uri)
    assert h.pread(len(payload), 12345) == payload
    h.shutdown()


def test_a_flush_on_file_storage_reaches_the_disk(file_daemon: Any, tmp_path: Path) -> None:
    """SlateDB's file store writes and renames but never syncs, so a FLUSH
    would survive a daemon crash but not a power cut. strace shows the
    daemon's syncfs after the WAL flush; memory storage has none to do."""
    trace = tmp_path / "strace.txt"
    pid = file_daemon.process.pid
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=syncfs", "-o", str(trace), "-p", str(pid)],
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # attached to every thread
        with connected(file_daemon.uri) as h:
            h.pwrite(b"d" * 4096, 0)
            h.flush()
        time.sleep(0.5)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    calls = [line for line in trace.read_text().splitlines() if "syncfs(" in line]
    assert calls and all("= 0" in line for line in calls), trace.read_text()
    assert file_daemon.status()["stats"]["store"]["syncs"] >= 1
