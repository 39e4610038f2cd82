"""Requests up to 64 MiB (issue 14 item 6), as nbd-server and nbdkit serve them.

Clients that never negotiate block sizes (old nbd-client builds, test tools)
send READ and WRITE requests of up to 64 MiB. portalbd advertises 64 MiB as
its maximum payload, serves requests up to it, refuses larger ones as the
NBD spec says (EINVAL for a WRITE, whose payload is skipped; EOVERFLOW for a
READ), and keeps memory within its payload budget whatever the mix.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from portalbd.nbd import protocol as p
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected, proc_kib
from tests.support.rawnbd import RawClient, attach, raw

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
LARGE = 64 * MIB


def reply(client: RawClient) -> tuple[int, int]:
    got = client.simple_reply()
    return got.error, got.handle


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
        client = attach(s)
        s.settimeout(60)
        client.send(p.Cmd.WRITE, 1, 0, LARGE, payload=data)
        assert reply(client) == (0, 1)
        client.send(p.Cmd.READ, 2, 0, LARGE)
        got = client.simple_reply()
        assert (got.error, got.handle) == (0, 2)
        assert got.data == data


def test_larger_than_64_mib_is_refused_as_the_spec_says(daemon: RunningDaemon) -> None:
    with raw(daemon, reset=False) as s:
        client = attach(s)
        s.settimeout(60)
        # The payload is skipped, not parsed as requests.
        client.send(p.Cmd.WRITE, 1, 0, LARGE + 1, payload=b"\x5a" * (LARGE + 1))
        assert reply(client) == (p.Err.EINVAL, 1)
        client.send(p.Cmd.READ, 2, 0, LARGE + 1)
        assert reply(client) == (p.Err.EOVERFLOW, 2)
        client.send(p.Cmd.READ, 3, 0, 4096)
        got = client.simple_reply()
        assert (got.error, got.handle) == (0, 3)
        assert got.data == bytes(4096)  # nothing of the refused write landed
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
                client = attach(s)
                s.settimeout(120)
                offset = index * 3 * LARGE
                for i in range(3):
                    client.send(p.Cmd.WRITE, i, offset + i * LARGE, LARGE, payload=data)
                for i in range(3):
                    client.send(p.Cmd.READ, 10 + i, offset + i * LARGE, LARGE)
                seen = set()
                for _ in range(6):
                    got = client.simple_reply()
                    assert got.error == 0
                    if got.handle >= 10:  # a READ's: the codec took its data
                        assert got.data == data
                    seen.add(got.handle)
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
