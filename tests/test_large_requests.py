"""Requests up to 64 MiB (issue 14 item 6), as nbd-server and nbdkit serve them.

Clients that never negotiate block sizes (old nbd-client builds, test tools)
send READ and WRITE requests of up to 64 MiB. portalbd advertises 64 MiB as
its maximum payload, serves requests up to it, refuses larger ones as the
NBD spec says (EINVAL for a WRITE, whose payload is skipped; EOVERFLOW for a
READ), and keeps memory within its payload budget whatever the mix.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from portalbd.nbd import protocol as p
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected
from tests.test_hostile_clients import attach, proc_kib, raw, recv_exactly

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
LARGE = 64 * MIB


def reply(s: socket.socket) -> tuple[int, int]:
    magic, error, handle = p.SIMPLE_REPLY.unpack(recv_exactly(s, p.SIMPLE_REPLY.size))
    assert magic == p.SIMPLE_REPLY_MAGIC
    return error, handle


def pattern(seed: int, length: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * (MIB // 32)
    return block * (length // MIB)


def test_libnbd_sees_64_mib_and_moves_it(daemon: RunningDaemon) -> None:
    data = pattern(1, LARGE)
    with connected(daemon.uri) as h:
        import nbd

        assert h.get_block_size(nbd.SIZE_MAXIMUM) == LARGE
        h.pwrite(data, MIB)
        h.flush()
        assert h.pread(LARGE, MIB) == data


def test_raw_client_without_block_sizes_moves_64_mib(daemon: RunningDaemon) -> None:
    data = pattern(2, LARGE)
    with raw(daemon, reset=False) as s:
        attach(s)
        s.settimeout(60)
        s.sendall(p.encode_request(p.Cmd.WRITE, 1, 0, LARGE))
        s.sendall(data)
        assert reply(s) == (0, 1)
        s.sendall(p.encode_request(p.Cmd.READ, 2, 0, LARGE))
        assert reply(s) == (0, 2)
        assert recv_exactly(s, LARGE) == data


def test_larger_than_64_mib_is_refused_as_the_spec_says(daemon: RunningDaemon) -> None:
    with raw(daemon, reset=False) as s:
        attach(s)
        s.settimeout(60)
        s.sendall(p.encode_request(p.Cmd.WRITE, 1, 0, LARGE + 1))
        s.sendall(b"\x5a" * (LARGE + 1))  # skipped, not parsed as requests
        assert reply(s) == (p.Err.EINVAL, 1)
        s.sendall(p.encode_request(p.Cmd.READ, 2, 0, LARGE + 1))
        assert reply(s) == (p.Err.EOVERFLOW, 2)
        s.sendall(p.encode_request(p.Cmd.READ, 3, 0, 4096))
        assert reply(s) == (0, 3)
        assert recv_exactly(s, 4096) == bytes(4096)  # nothing of the refused write landed
    log = daemon.log()
    assert "invalid request" in log and "EOVERFLOW" in log and "EINVAL" in log


def test_many_large_requests_at_once_stay_within_the_budget(
    daemon_factory: DaemonFactory,
) -> None:
    """6 connections each pipelining 3 x 64 MiB WRITEs and 3 x 64 MiB READs:
    1.1 GiB of payload in flight if each connection buffered its own."""
    daemon = daemon_factory("--cache-bytes", str(8 * MIB), disk_size_gb=2)
    pid = daemon.process.pid
    before = proc_kib(pid, "VmRSS")
    data = pattern(3, LARGE)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with raw(daemon, reset=False) as s:
                attach(s)
                s.settimeout(120)
                offset = index * 3 * LARGE
                for i in range(3):
                    s.sendall(p.encode_request(p.Cmd.WRITE, i, offset + i * LARGE, LARGE))
                    s.sendall(data)
                for i in range(3):
                    s.sendall(p.encode_request(p.Cmd.READ, 10 + i, offset + i * LARGE, LARGE))
                seen = set()
                for _ in range(3):
                    error, handle = reply(s)
                    assert error == 0
                    seen.add(handle)
                for _ in range(3):
                    error, handle = reply(s)
                    assert error == 0
                    assert recv_exactly(s, LARGE) == data
                    seen.add(handle)
                assert seen == {0, 1, 2, 10, 11, 12}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert time.monotonic() - start < 150
    hwm = proc_kib(pid, "VmHWM")
    print(f"large requests: VmRSS before {before // 1024} MiB, HWM {hwm // 1024} MiB")
    # Budget 128 MiB + dirty buffer 64 MiB + cache 8 MiB + SlateDB memtable,
    # and the device and transport copy a 64 MiB request more than once: one
    # client alone peaks about 350 MiB above the start. Unbounded, six would
    # hold 2.3 GiB of payload.
    assert hwm - before < 1024 * 1024, (before, hwm)
