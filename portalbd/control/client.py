"""The blocking client for the control socket: portalctl, tests, benchmarks, trace tools.

It has no event loop, so a CLI starts fast; `portalbd.control.async_client`
is the same client for asyncio code. Both raise only the errors in
`portalbd.control.errors`, worded by `Messages`.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from portalbd.control import calls, replies
from portalbd.control.errors import (
    ConnectionLost,
    Messages,
    ProtocolError,
)
from portalbd.control.protocol import encode_document

T = TypeVar("T")

# A daemon whose accept backlog is full refuses new connections with EAGAIN
# for a moment; it is busy, not gone, so connecting is retried this often.
BUSY_RETRY_S = 0.05


class ControlClient:
    """One connection, opened on first use; requests are answered in order on it.

    ``timeout`` bounds each request, connecting included. After any failure
    the connection is dropped (a late reply would be read as the next one's)
    and the next request opens a new one.
    """

    def __init__(self, path: Path, timeout: float = 30.0, *, name_socket: bool = True) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.messages = Messages(self.path, name_socket)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = bytearray()

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.connect(str(self.path))
            except BlockingIOError as exc:
                sock.close()
                if time.monotonic() + BUSY_RETRY_S >= deadline:
                    raise self.messages.connect_failed(exc) from None
                time.sleep(BUSY_RETRY_S)
                continue
            except OSError as exc:
                sock.close()
                raise self.messages.connect_failed(exc) from None
            self._sock = sock
            return sock

    def raw(self, request: Any) -> Any:
        """Send a request document, return the decoded response, ``{"Error": ...}`` included."""
        deadline = time.monotonic() + self.timeout
        sock = self._connect(deadline)
        buffer = self._buffer
        try:
            sock.sendall(encode_document(request))
            end = buffer.find(b"\n")
            while end < 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise self.messages.closed()
                scanned = len(buffer)  # search only what is new: long replies stay linear
                buffer += chunk
                end = buffer.find(b"\n", scanned)
                if len(buffer) > replies.MAX_REPLY and not 0 <= end <= replies.MAX_REPLY:
                    raise replies.too_long()
        except TimeoutError:
            self.close()
            raise self.messages.no_answer(self.timeout) from None
        except (ConnectionLost, ProtocolError):
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise self.messages.broken(exc) from None
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        try:
            return replies.decode(line)
        except ProtocolError:
            self.close()
            raise

    def request(self, request: Any) -> Any:
        """Like `raw`, but an ``{"Error": ...}`` reply raises `DaemonError`."""
        reply = self.raw(request)
        refused = replies.refusal(reply)
        if refused is not None:
            raise refused
        return reply

    def call(self, call: calls.Call[T]) -> T:
        return call.read(self.request(call.request))

    def status(self) -> dict[str, Any]:
        return self.call(calls.status())

    def snapshot_create(self, name: str) -> dict[str, Any]:
        return self.call(calls.snapshot_create(name))

    def snapshot_list(self) -> list[dict[str, Any]]:
        return self.call(calls.snapshot_list())

    def snapshot_get(self, name: str) -> dict[str, Any]:
        return self.call(calls.snapshot_get(name))

    def snapshot_delete(self, name: str) -> None:
        self.call(calls.snapshot_delete(name))

    def snapshot_restore(self, name: str, force: bool = False) -> None:
        self.call(calls.snapshot_restore(name, force))

    def log(self, lines: int = 100, after: int = -1) -> list[dict[str, Any]]:
        """The daemon's recent log records, oldest first (`Log`)."""
        return self.call(calls.log(lines, after))


def request_once(path: Path, request: Any, timeout: float = 60.0) -> Any:
    """One request on its own connection; the reply as decoded, ``{"Error": ...}`` included."""
    with ControlClient(path, timeout) as client:
        return client.raw(request)
