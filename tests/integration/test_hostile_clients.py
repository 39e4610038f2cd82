"""Hostile, unauthenticated clients against a real daemon (issue 20, items 4, 5, 7).

Each test reproduces one attack with raw sockets and checks what it costs the
daemon (VmRSS/VmHWM of the real process) and what a real client (libnbd)
still gets meanwhile. Bounds are generous: the machine is shared and noisy,
and the defects these guard against cost gigabytes and tens of seconds.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import nbd
import pytest

from portalbd.nbd import protocol as p
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected, nbd_handle, proc_kib
from tests.support.rawnbd import attach, raw, recv_exactly

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def send_some(s: socket.socket, data: bytes, seconds: float) -> int:
    """Send as much of ``data`` as the daemon takes within ``seconds``."""
    s.settimeout(seconds)
    view = memoryview(data)
    sent = 0
    with contextlib.suppress(OSError):
        while sent < len(view):
            sent += s.send(view[sent : sent + MIB])
    return sent


def is_closed(s: socket.socket, timeout: float) -> bool:
    """True once the daemon closed the connection (EOF or reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        while s.recv(MIB):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def well_behaved(daemon: RunningDaemon, tag: int) -> None:
    """Full service through libnbd: write, flush, read back."""
    data = bytes([tag % 256]) * 65536
    offset = (tag % 64) * 65536
    with connected(daemon.uri) as h:
        h.pwrite(data, offset)
        h.flush()
        assert h.pread(len(data), offset) == data


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


def settle_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS after the daemon had a moment to take in what was sent."""
    time.sleep(seconds)
    return proc_kib(pid, "VmRSS")


# --- item 4: memory --------------------------------------------------------------


def test_stalled_write_payloads_take_bounded_memory(daemon: RunningDaemon) -> None:
    """30 clients each announce a 32 MiB WRITE, send half of it and stall.

    Before: every connection got its own 32 MiB buffer, RSS 45 MiB -> 1 GiB,
    held forever. Now write payloads share one budget (128 MiB by default).
    """
    pid = daemon.process.pid
    well_behaved(daemon, 1)
    before = proc_kib(pid, "VmRSS")
    length = 32 * MIB
    half = b"\xa5" * (length // 2)
    with sockets() as held:
        for i in range(30):
            s = raw(daemon)
            held.append(s)
            attach(s)
            s.sendall(p.encode_request(p.Cmd.WRITE, i, i * length, length))
            send_some(s, half, 0.2)
        after = settle_rss(pid)
        hwm = proc_kib(pid, "VmHWM")
        print(f"stalled writes: VmRSS {before // 1024} -> {after // 1024} MiB, HWM {hwm // 1024}")
        assert after - before < 400 * 1024, (before, after)
        assert hwm - before < 450 * 1024, (before, hwm)
        # A real client still gets full service while they stall.
        start = time.monotonic()
        well_behaved(daemon, 2)
        assert time.monotonic() - start < 60
    assert daemon.process.poll() is None


def test_replies_never_read_take_bounded_memory(daemon: RunningDaemon) -> None:
    """10k 1 MiB READs whose replies are never read.

    Before: every reply was produced and queued in the transport, 2.4 GiB.
    Now the daemon stops reading requests while a connection's replies are
    unsent.
    """
    pid = daemon.process.pid
    with connected(daemon.uri) as h:  # 16 MiB the daemon answers from memory
        for i in range(16):
            h.pwrite(bytes([i + 1]) * MIB, i * MIB)
    well_behaved(daemon, 3)
    before = proc_kib(pid, "VmRSS")
    with sockets() as held:
        s = raw(daemon)
        held.append(s)
        attach(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        requests = b"".join(
            p.encode_request(p.Cmd.READ, i, (i % 16) * MIB, MIB) for i in range(10_000)
        )
        send_some(s, requests, 5)
        after = settle_rss(pid)
        hwm = proc_kib(pid, "VmHWM")
        print(f"unread replies: VmRSS {before // 1024} -> {after // 1024} MiB, HWM {hwm // 1024}")
        assert after - before < 300 * 1024, (before, after)
        assert hwm - before < 400 * 1024, (before, hwm)
        well_behaved(daemon, 4)
    # The connection is gone: what it held is released.
    time.sleep(1)
    well_behaved(daemon, 5)
    assert daemon.process.poll() is None


def test_a_stalled_payload_is_dropped_with_a_log_line(daemon: RunningDaemon) -> None:
    """A WRITE payload that stops arriving closes its connection."""
    with sockets() as held:
        s = raw(daemon, reset=False)
        held.append(s)
        attach(s)
        s.sendall(p.encode_request(p.Cmd.WRITE, 1, 0, MIB) + b"x" * 1000)
        assert is_closed(s, 60)
    log = daemon.log()
    assert "write payload stalled" in log
    assert "received 1000 of 1048576 bytes" in log
    well_behaved(daemon, 6)


# --- item 5: handshake slowloris -----------------------------------------------------


def test_handshake_slowloris_does_not_lock_out_real_clients(
    daemon_factory: DaemonFactory,
) -> None:
    """300 sockets that send one byte of the handshake each and stall.

    Before: they took every connection slot, real clients were refused with
    "too many connections" for ~10 s, and every refusal logged a warning.
    """
    daemon = daemon_factory("--max-connections", "4")
    with sockets() as held:
        for _ in range(300):
            s = raw(daemon)
            held.append(s)
            s.sendall(b"\x00")
        time.sleep(0.5)
        # Every attached slot is still there for real clients.
        start = time.monotonic()
        clients = [nbd_handle(daemon.uri) for _ in range(4)]
        try:
            for i, h in enumerate(clients):
                h.pwrite(bytes([i]) * 4096, i * 4096)
                assert h.pread(4096, i * 4096) == bytes([i]) * 4096
            # The fifth is refused because of the four attached ones only.
            with pytest.raises(nbd.Error, match="server policy prevents NBD_OPT_GO"):
                nbd_handle(daemon.uri)
        finally:
            for h in clients:
                h.shutdown()
        assert time.monotonic() - start < 30
    log = daemon.log()
    assert "too many connections (max_connections = 4)" in log
    # The stalled handshakes were dropped, and said so, but not 300 times.
    noisy = [
        line
        for line in log.splitlines()
        if "WARNING" in line and ("handshake" in line or "refused" in line)
    ]
    assert len(noisy) < 40, noisy[:50]
    assert daemon.process.poll() is None


def test_stalled_handshakes_time_out_quickly(daemon: RunningDaemon) -> None:
    with sockets() as held:
        s = raw(daemon, reset=False)
        held.append(s)
        recv_exactly(s, p.SERVER_GREETING.size)
        s.sendall(b"\x00")
        start = time.monotonic()
        assert is_closed(s, 30)
        assert time.monotonic() - start < 30
    assert "handshake not finished within" in daemon.log()


# --- item 7: restore --force closes cleanly ---------------------------------------------


def busy_client(daemon: RunningDaemon, ended: list[str]) -> None:
    """Keeps four 4 KiB READs in flight until the daemon closes; records how."""
    s = raw(daemon, reset=False)
    try:
        client = attach(s)
        s.settimeout(30)
        handle = 0
        while True:
            batch = b"".join(
                client.replies.request(p.Cmd.READ, handle + i, i * 4096, 4096) for i in range(4)
            )
            handle += 4
            s.sendall(batch)
            for _ in range(4):
                reply = client.simple_reply()
                assert reply.error == 0 and len(reply.data) == 4096
    except ConnectionResetError:
        ended.append("reset")
    except (ConnectionError, BrokenPipeError):
        ended.append("eof")
    except OSError as exc:
        ended.append(f"error {exc}")
    finally:
        s.close()


def test_restore_force_disconnects_with_fin_not_reset(daemon: RunningDaemon) -> None:
    """Before: about half the clients busy during ``restore --force`` saw a
    TCP reset (their pipelined requests were unread when the socket closed)."""
    import threading

    assert "Snapshot" in daemon.control({"SnapshotCreate": {"name": "clean"}})
    ended: list[str] = []
    threads = [threading.Thread(target=busy_client, args=(daemon, ended)) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1)
    assert daemon.control({"SnapshotRestore": {"name": "clean", "force": True}}) == "Ok"
    for t in threads:
        t.join(60)
    assert ended == ["eof"] * 6, ended
    well_behaved(daemon, 9)
