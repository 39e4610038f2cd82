"""Bad input from clients: each gets a clear reply or error, and nothing is lost.

These speak NBD over raw sockets with a small client written here (not the
daemon's codec), so a mistake in the codec cannot hide itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, nbd_handle, run_portalbd
from tests.support.rawnbd import recv_exactly

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_ERR_POLICY = (1 << 31) + 2
CMD_READ, CMD_WRITE, CMD_FLUSH = 0, 1, 3
EINVAL, ENOSPC = 22, 28
SIZE = 1 << 30
MAX_PAYLOAD = 64 << 20


def is_closed(sock: socket.socket, timeout: float = 10) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def go(sock: socket.socket, name: bytes = b"") -> tuple[int, bytes]:
    """Fixed newstyle handshake and OPT_GO; returns the final reply (type, data)."""
    sock.settimeout(30)
    magic, opt_magic, _flags = struct.unpack(">QQH", recv_exactly(sock, 18))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        reply_magic, option, kind, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        assert reply_magic == OPT_REPLY_MAGIC and option == OPT_GO
        payload = recv_exactly(sock, length)
        if kind == REP_ACK or kind & (1 << 31):
            return kind, payload


@contextlib.contextmanager
def transmission(daemon: RunningDaemon) -> Iterator[socket.socket]:
    """A raw connection in the transmission phase (simple replies)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    try:
        kind, _ = go(sock)
        assert kind == REP_ACK
        yield sock
    finally:
        sock.close()


def request(
    sock: socket.socket, command: int, offset: int, length: int, handle: int, flags: int = 0
) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length))


def reply(sock: socket.socket) -> tuple[int, int]:
    """A simple reply's (error, handle)."""
    magic, error, handle = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC
    return error, handle


def round_trip_ok(sock: socket.socket, offset: int = 0, data: bytes = b"still here") -> None:
    """The connection still serves a write and a read."""
    request(sock, CMD_WRITE, offset, len(data), 901)
    sock.sendall(data)
    assert reply(sock) == (0, 901)
    request(sock, CMD_READ, offset, len(data), 902)
    assert reply(sock) == (0, 902)
    assert recv_exactly(sock, len(data)) == data


def test_read_past_end_is_einval(daemon: RunningDaemon) -> None:
    with transmission(daemon) as sock:
        request(sock, CMD_READ, SIZE - 10, 20, 1)
        assert reply(sock) == (EINVAL, 1)  # no payload follows an error
        request(sock, CMD_READ, SIZE, 1, 2)
        assert reply(sock) == (EINVAL, 2)
        request(sock, CMD_READ, (1 << 64) - 1, 1, 3)  # offset + length overflows
        assert reply(sock) == (EINVAL, 3)
        round_trip_ok(sock)


def test_write_past_end_is_enospc_and_payload_skipped(daemon: RunningDaemon) -> None:
    with transmission(daemon) as sock:
        request(sock, CMD_WRITE, SIZE - 4, 8, 1)
        sock.sendall(b"PAYLOAD!")  # must be skipped, not parsed as a header
        assert reply(sock) == (ENOSPC, 1)
        round_trip_ok(sock)
        request(sock, CMD_READ, SIZE - 4, 4, 3)
        assert reply(sock) == (0, 3)
        assert recv_exactly(sock, 4) == bytes(4)  # nothing of it landed


def test_oversized_write_is_refused_and_connection_stays(daemon: RunningDaemon) -> None:
    length = MAX_PAYLOAD + 4096
    with transmission(daemon) as sock:
        request(sock, CMD_WRITE, 0, length, 7)
        sock.sendall(b"\x5a" * length)
        assert reply(sock) == (EINVAL, 7)
        round_trip_ok(sock)
        request(sock, CMD_READ, MAX_PAYLOAD, 4096, 8)
        assert reply(sock) == (0, 8)
        assert recv_exactly(sock, 4096) == bytes(4096)


def test_oversized_read_is_refused(daemon: RunningDaemon) -> None:
    with transmission(daemon) as sock:
        request(sock, CMD_READ, 0, MAX_PAYLOAD + 1, 5)
        error, handle = reply(sock)
        assert handle == 5 and error != 0
        round_trip_ok(sock)


@pytest.mark.parametrize("command", [12, 99, 0xFFFF])
def test_unknown_command_is_einval(daemon: RunningDaemon, command: int) -> None:
    with transmission(daemon) as sock:
        request(sock, command, 0, 0, 77)
        assert reply(sock) == (EINVAL, 77)
        round_trip_ok(sock)


def test_unknown_flag_is_einval(daemon: RunningDaemon) -> None:
    with transmission(daemon) as sock:
        request(sock, CMD_FLUSH, 0, 0, 78, flags=0x8000)
        assert reply(sock) == (EINVAL, 78)
        round_trip_ok(sock)


def test_wrong_request_magic_closes_only_that_connection(daemon: RunningDaemon) -> None:
    other = nbd_handle(daemon.uri)
    other.pwrite(b"bystander", 0)
    with transmission(daemon) as sock:
        sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
        assert is_closed(sock)
    with transmission(daemon) as sock:
        sock.sendall(os.urandom(4096))
        assert is_closed(sock)
    assert other.pread(9, 0) == b"bystander"
    other.shutdown()
    assert daemon.process.poll() is None
    assert "bad request magic" in daemon.log()


@pytest.mark.parametrize(
    ("garbage", "logged"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unsupported client flags 0x47455420"),
        (struct.pack(">IQII", 3, 0x1122334455667788, OPT_GO, 0), "magic"),
    ],
)
def test_garbage_handshake_closes_only_that_connection(
    daemon: RunningDaemon, garbage: bytes, logged: str
) -> None:
    other = nbd_handle(daemon.uri)
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    recv_exactly(sock, 18)
    sock.sendall(garbage)
    assert is_closed(sock)
    sock.close()
    other.pwrite(b"fine", 4096)
    assert other.pread(4, 4096) == b"fine"
    other.shutdown()
    assert logged in daemon.log()


def test_connections_beyond_max_are_refused_cleanly(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--max-connections", "2")
    first = socket.create_connection(("127.0.0.1", d.port))
    second = socket.create_connection(("127.0.0.1", d.port))
    try:
        assert go(first)[0] == REP_ACK
        assert go(second)[0] == REP_ACK
        with socket.create_connection(("127.0.0.1", d.port)) as third:
            kind, message = go(third)
            assert kind == REP_ERR_POLICY
            assert b"too many connections" in message
            assert b"max_connections = 2" in message
        with pytest.raises(nbd.Error, match="server policy prevents NBD_OPT_GO"):
            nbd_handle(d.uri)
        round_trip_ok(first)
    finally:
        first.close()
        second.close()
    # a slot frees up once a client leaves
    for _ in range(100):
        try:
            handle = nbd_handle(d.uri)
        except nbd.Error:
            threading.Event().wait(0.05)
            continue
        assert handle.pread(10, 0) == b"still here"
        handle.shutdown()
        break
    else:
        pytest.fail("no connection slot came free")
    assert "connection refused" in d.log()


def test_client_vanishing_mid_payload_or_reply(daemon: RunningDaemon) -> None:
    other = nbd_handle(daemon.uri)
    other.pwrite(b"\x11" * 8192, 0)
    with transmission(daemon) as sock:
        request(sock, CMD_WRITE, 0, 1 << 20, 1)
        sock.sendall(b"\x22" * 100_000)  # then gone, mid-payload
    with transmission(daemon) as sock:
        for i in range(32):  # 32 MiB of replies nobody reads
            request(sock, CMD_READ, i << 20, 1 << 20, i)
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 99, 0, 4096))
        sock.sendall(b"\x33" * 10)
    assert other.pread(8192, 0) == b"\x11" * 8192  # the half-sent write never landed
    other.pwrite(b"after", 100)
    assert other.pread(5, 100) == b"after"
    other.shutdown()
    assert daemon.process.poll() is None


def test_second_daemon_on_the_same_control_socket_is_refused(file_daemon: RunningDaemon) -> None:
    assert file_daemon.storage_url is not None
    for _ in range(2):  # refused every time: the refusal leaves the socket in place
        result = run_portalbd(
            "--storage-url",
            file_daemon.storage_url,
            "--socket",
            str(file_daemon.control_socket),
            "--nbd-address",
            "127.0.0.1:0",
        )
        assert result.returncode == 1
        assert "another portalbd is already running on control socket" in result.stderr
        assert str(file_daemon.control_socket) in result.stderr
    # the first one never noticed: its control socket and its disk still work
    assert file_daemon.status()
    handle = nbd_handle(file_daemon.uri)
    handle.pwrite(b"mine", 0)
    handle.flush()
    handle.shutdown()
    assert "fenced" not in file_daemon.log()


def test_second_daemon_with_another_socket_fences_the_first(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/data"
    old = daemon_factory(storage_url=url, workdir=tmp_path / "old")
    old_client = nbd_handle(old.uri)
    old_client.pwrite(b"before", 0)
    old_client.flush()
    new = daemon_factory(storage_url=url, workdir=tmp_path / "new")
    new_client = nbd_handle(new.uri)
    assert new_client.pread(6, 0) == b"before"
    # The fenced daemon can no longer make anything durable...
    with pytest.raises(nbd.Error) as raised:
        for _ in range(100):
            old_client.pwrite(b"stale!", 0)
            old_client.flush()
            threading.Event().wait(0.1)
    assert raised.value.errno in ("EIO", "ESHUTDOWN", "ENOTCONN")
    # ...stops serving, says why, and exits non-zero.
    assert old.process.wait(30) == 1
    log = old.log()
    assert "fenced this daemon out" in log
    assert f"another portalbd opened storage {url}" in log
    assert "stopping:" in log
    # The new owner's disk is intact and keeps working.
    assert new_client.pread(6, 0) == b"before"
    new_client.pwrite(b"after!", 0)
    new_client.flush()
    assert new_client.pread(6, 0) == b"after!"
    new_client.shutdown()


@pytest.mark.parametrize(
    ("command", "offset", "length", "flags", "expected"),
    [
        (7, 0, 4096, 0, EINVAL),  # BLOCK_STATUS without base:allocation negotiated
        (5, SIZE - 10, 20, 0, EINVAL),  # CACHE past the end
        (6, SIZE - 10, 20, 0, ENOSPC),  # WRITE_ZEROES past the end
        (4, SIZE, 1, 0, ENOSPC),  # TRIM past the end
        (CMD_READ, SIZE + 1, 0, 0, EINVAL),  # empty, but starting past the end
        (CMD_READ, 0, 0, 0, 0),  # empty requests are harmless
        (4, 0, 0, 0, 0),
        (6, SIZE, 0, 0, 0),
    ],
    ids=[
        "block-status-unnegotiated",
        "cache-past-end",
        "zeroes-past-end",
        "trim-past-end",
        "empty-read-past-end",
        "empty-read",
        "empty-trim",
        "empty-zeroes-at-end",
    ],
)
def test_edge_requests_get_their_error(
    daemon: RunningDaemon, command: int, offset: int, length: int, flags: int, expected: int
) -> None:
    with transmission(daemon) as sock:
        request(sock, command, offset, length, 55, flags)
        assert reply(sock) == (expected, 55)
        round_trip_ok(sock)
