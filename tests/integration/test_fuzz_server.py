"""Hostile clients against a live daemon, over real sockets.

Random and mutated handshakes, garbage request headers, lengths and flags,
clients that stall or vanish mid-payload, hundreds of connections at once,
and the same for the control socket. Throughout, the daemon must stay up,
its memory must stay bounded, and a well-behaved libnbd client must keep
full service (write, flush, read back).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd.nbd import protocol as p
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected
from tests.support.rawnbd import RawClient, recv_exactly

pytestmark = pytest.mark.timeout(240)

SEED = int(os.environ.get("PORTALBD_FUZZ_SEED", "20261125"))
FLAGS = struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def well_behaved(daemon: RunningDaemon, tag: int) -> None:
    """Full service: write, flush, read back, through libnbd."""
    data = bytes([tag % 256]) * 65536
    offset = (tag % 64) * 65536
    with connected(daemon.uri) as nbd:
        nbd.pwrite(data, offset)
        nbd.flush()
        assert nbd.pread(len(data), offset) == data


def sock(daemon: RunningDaemon) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


def handshake(s: socket.socket) -> None:
    """Fixed newstyle, EXPORT_NAME, no zeroes: simple replies."""
    RawClient(s).attach()


def drain(s: socket.socket, limit: float = 0.2) -> bytes:
    s.settimeout(limit)
    out = b""
    with contextlib.suppress(OSError):
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


@pytest.fixture
def fuzz_daemon(daemon_factory: DaemonFactory) -> Iterator[RunningDaemon]:
    daemon = daemon_factory("--max-connections", "64", "--cache-bytes", str(8 << 20))
    well_behaved(daemon, 1)
    yield daemon
    assert daemon.process.poll() is None, f"daemon died:\n{daemon.log()[-3000:]}"


def valid_handshake_bytes(rng: random.Random) -> bytes:
    parts = [FLAGS]
    if rng.random() < 0.5:
        parts.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.STRUCTURED_REPLY, 0))
    if rng.random() < 0.3:
        parts.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.LIST, 0))
    name = b"portalbd"
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    parts.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.GO, len(body)) + body)
    return b"".join(parts)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(buf)) if buf else 0
        roll = rng.random()
        if roll < 0.4 and buf:
            buf[pos] ^= rng.randint(1, 255)
        elif roll < 0.6:
            del buf[pos : pos + rng.randint(1, 6)]
        elif roll < 0.8:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 12))
        else:
            buf[pos : pos + 4] = struct.pack(">I", rng.choice([0, 0xFFFFFFFF, 65537, 4097]))
    return bytes(buf)


def test_random_and_mutated_handshakes(fuzz_daemon: RunningDaemon) -> None:
    rng = random.Random(SEED)
    start = rss_kib(fuzz_daemon.process.pid)
    for i in range(300):
        with sock(fuzz_daemon) as s, contextlib.suppress(OSError):
            recv_exactly(s, p.SERVER_GREETING.size)
            if rng.random() < 0.3:
                s.sendall(rng.randbytes(rng.randint(0, 200)))
            else:
                data = mutate(rng, valid_handshake_bytes(rng))
                for j in range(0, len(data), rng.randint(1, 16)):
                    s.sendall(data[j : j + 16])
            drain(s, 0.02)
        if i % 50 == 0:
            well_behaved(fuzz_daemon, i)
    well_behaved(fuzz_daemon, 2)
    # bounded: a few hundred hostile connections leave no lasting growth
    assert rss_kib(fuzz_daemon.process.pid) < start + 64 * 1024


def test_garbage_requests_after_a_valid_handshake(fuzz_daemon: RunningDaemon) -> None:
    rng = random.Random(SEED + 1)
    size = 1 << 30
    for i in range(150):
        with sock(fuzz_daemon) as s:
            handshake(s)
            for _ in range(rng.randint(1, 8)):
                command = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF])
                flags = rng.choice([0, 1, 2, 4, 8, 16, 0xFFFF, rng.randrange(1 << 16)])
                offset = rng.choice([0, size - 1, size, size + 4096, (1 << 64) - 1])
                length = rng.choice([0, 1, 512, 65536, p.MAX_PAYLOAD + 1, (1 << 32) - 1])
                magic = p.REQUEST_MAGIC if rng.random() < 0.9 else rng.randrange(1 << 32)
                header = p.REQUEST_HEADER.pack(magic, flags, command, i, offset, length)
                payload = b""
                if command == p.Cmd.WRITE and length <= 65536:
                    payload = rng.randbytes(length)
                with contextlib.suppress(OSError):
                    s.sendall(header + payload)
            drain(s, 0.02)
    well_behaved(fuzz_daemon, 3)


def test_disconnects_mid_payload_apply_nothing(fuzz_daemon: RunningDaemon) -> None:
    with connected(fuzz_daemon.uri) as nbd:
        nbd.pwrite(b"\x11" * 65536, 0)
        nbd.flush()
    for cut in (0, 1, 4096, 65535):
        with sock(fuzz_daemon) as s:
            handshake(s)
            s.sendall(p.encode_request(p.Cmd.WRITE, 7, 0, 65536) + b"\x22" * cut)
    with connected(fuzz_daemon.uri) as nbd:
        assert nbd.pread(65536, 0) == b"\x11" * 65536


def test_stalled_clients_do_not_lock_out_others(fuzz_daemon: RunningDaemon) -> None:
    """Clients that connect and never finish (or never start) the handshake
    must not keep well-behaved clients out for good."""
    stalled = []
    try:
        for _ in range(70):
            s = sock(fuzz_daemon)
            stalled.append(s)
        for s in stalled[:20]:
            s.sendall(FLAGS)  # half a handshake, then silence
        for s in stalled[20:40]:
            handshake(s)
            s.sendall(p.encode_request(p.Cmd.WRITE, 1, 0, 65536) + b"x" * 100)  # stall mid-payload
        deadline = time.monotonic() + 60
        while True:
            try:
                well_behaved(fuzz_daemon, 4)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        for s in stalled:
            s.close()
    well_behaved(fuzz_daemon, 5)


def test_hundreds_of_connections_at_once(fuzz_daemon: RunningDaemon) -> None:
    start = rss_kib(fuzz_daemon.process.pid)
    conns = []
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                conns.append(sock(fuzz_daemon))
        for s in conns:
            with contextlib.suppress(OSError):
                s.sendall(FLAGS)
    finally:
        for s in conns:
            s.close()
    well_behaved(fuzz_daemon, 6)
    assert rss_kib(fuzz_daemon.process.pid) < start + 64 * 1024


# --- the control socket --------------------------------------------------------------


def control_lines(path: Path, payload: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        return drain(s, timeout)


def test_control_socket_garbage(fuzz_daemon: RunningDaemon) -> None:
    rng = random.Random(SEED + 2)
    path = fuzz_daemon.control_socket
    samples = [
        b"\n",
        b"{\n",
        b"null\n",
        b"[]\n",
        b'"Nope"\n',
        b'{"SnapshotCreate": 5}\n',
        b'{"SnapshotCreate": {"name": 5}}\n',
        b'{"SnapshotCreate": {"name": "../../etc"}}\n',
        b'{"SnapshotRestore": {"name": "x", "force": "yes"}}\n',
        b'{"Status": {}, "Metrics": {}}\n',
        b"\xff\xfe\n",
        b'"' + b"A" * 70000 + b'"\n',
        b"1e999999\n",
        b"[" * 100000 + b"\n",
    ]
    for _ in range(100):
        base = rng.choice(
            [b'{"SnapshotGet": {"name": "a"}}', b'"Status"', b'{"TraceStart": {"path": "/x"}}']
        )
        samples.append(mutate(rng, base) + b"\n")
    for payload in samples:
        for line in control_lines(path, payload).splitlines():
            json.loads(line)  # every answer is one JSON document
    assert "Status" in fuzz_daemon.control("Status")


def test_control_socket_stalled_and_many_clients(fuzz_daemon: RunningDaemon) -> None:
    path = fuzz_daemon.control_socket
    stalled = []
    try:
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stalled.append(s)
            s.connect(str(path))  # blocking: waits while the accept backlog is full
            s.settimeout(10)
            if i % 2:
                s.sendall(b'{"Status"')  # half a line, then silence
        assert "Status" in fuzz_daemon.control("Status", timeout=20)
        well_behaved(fuzz_daemon, 7)
    finally:
        for s in stalled:
            s.close()
