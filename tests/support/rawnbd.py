"""A raw-socket NBD client for tests, speaking through the daemon's codec.

Tests that need to send what libnbd never would (stalls, garbage, huge
requests) still handshake and read replies through the same codec the
daemon serves with, instead of a hand-written parser per test file.
(tests/integration/test_bad_input.py keeps its own independent client on purpose: it
checks the codec against a second reading of the spec.)
"""

from __future__ import annotations

import socket
import struct

from portalbd.nbd import protocol as p
from tests.support import RunningDaemon


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class RawClient:
    """Handshake, requests and replies over one blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.replies = p.ReplyDecoder()

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def attach(
        self,
        *,
        export: str = "",
        structured: bool = False,
        meta: bool = False,
        go: bool = False,
    ) -> p.ClientReady:
        """Handshake; by default EXPORT_NAME without zeroes (simple replies)."""
        handshake = p.ClientHandshake(
            export_name=export,
            structured=structured,
            meta_contexts=(p.BASE_ALLOCATION,) if meta else (),
            go=go,
        )
        event: p.ClientReady | p.ClientRefused | None = None
        while event is None:
            out, event = handshake.receive_data(self._recv())
            if out:
                self.sock.sendall(out)
        if isinstance(event, p.ClientRefused):
            raise ConnectionRefusedError(event.refusal.message)
        self.replies.receive_data(handshake.leftover)
        return event

    def send(
        self,
        command: int,
        handle: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        """One request (a WRITE's payload after its header); its reply is expected."""
        self.sock.sendall(self.replies.request(command, handle, offset, length, flags))
        if payload:
            self.sock.sendall(payload)

    def reply(self) -> p.SimpleReply | p.ReplyChunk:
        """The next reply (or structured chunk), waiting for its bytes."""
        while True:
            event = self.replies.next_event()
            if event is not p.NEED_DATA:
                return event
            self.replies.receive_data(self._recv())

    def simple_reply(self) -> p.SimpleReply:
        reply = self.reply()
        assert isinstance(reply, p.SimpleReply), reply
        return reply


def raw(daemon: RunningDaemon, *, reset: bool = True) -> socket.socket:
    """A TCP connection to the daemon, reset on close by default so none lingers."""
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    if reset:  # the test's own close must not linger either
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


def attach(s: socket.socket) -> RawClient:
    """Fixed newstyle, EXPORT_NAME, no zeroes: simple replies."""
    client = RawClient(s)
    client.attach()
    return client
