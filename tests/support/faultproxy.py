"""An HTTP fault proxy for S3: between the daemon and moto_server.

Each request the daemon sends is looked at on its own (HTTP/1.1,
keep-alive on the client side, a fresh upstream connection per request) and,
per a seeded schedule, forwarded untouched or given one fault:

``500`` / ``503``  an S3 error answer without reaching moto;
``delay``          forwarded after a pause;
``reset``          the connection is reset before any answer;
``stall``          no answer at all until the client gives up (its timeout);
``truncate``       forwarded, but the answer is cut short and the connection closed;
``lost``           forwarded (moto applies it), but the answer is replaced by a
                   reset: the request happened and the client cannot know.

The schedule is a seeded random draw per request; the order in which
concurrent requests draw is up to the threads, so the mix is reproducible,
the exact assignment is not. ``rate`` may be changed at any time (0 = clean).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter

FAULTS = ("500", "503", "delay", "reset", "stall", "truncate", "lost")

_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    b"<Message>injected by faultproxy</Message></Error>"
)


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        seed: int,
        rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        stall_seconds: float = 4.0,
        max_delay: float = 0.3,
    ) -> None:
        self.target_port = target_port
        self.rate = rate
        self.faults = faults
        self.stall_seconds = stall_seconds
        self.max_delay = max_delay
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)

    def injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "ok")

    def _draw(self) -> str:
        with self._lock:
            fault = "ok" if self._rng.random() >= self.rate else self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    def _delay(self) -> float:
        with self._lock:
            return self._rng.uniform(0, self.max_delay)

    # --- plumbing ----------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        try:
            while not self._stopping.is_set():
                request = reader.request()
                if request is None:
                    return
                if not self._handle(conn, request):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, conn: socket.socket, request: bytes) -> bool:
        """Answer one request; False when the connection must end."""
        fault = self._draw()
        if fault in ("500", "503"):
            code = b"InternalError" if fault == "500" else b"SlowDown"
            body = _ERROR_BODY.replace(b"{code}", code)
            status = b"500 Internal Server Error" if fault == "500" else b"503 Slow Down"
            conn.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            return True
        if fault == "reset":
            _reset(conn)
            return False
        if fault == "stall":
            self._stopping.wait(self.stall_seconds)
            _reset(conn)
            return False
        if fault == "delay":
            time.sleep(self._delay())
        response = self._forward(request)
        if fault == "lost":
            _reset(conn)
            return False
        if fault == "truncate":
            conn.sendall(response[: max(1, len(response) // 2)])
            _reset(conn)
            return False
        conn.sendall(response)
        return True

    def _forward(self, request: bytes) -> bytes:
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
        upstream_request = b"\r\n".join([lines[0], *kept, b"Connection: close"])
        with socket.create_connection(("127.0.0.1", self.target_port), timeout=30) as up:
            up.sendall(upstream_request + b"\r\n\r\n" + body)
            chunks = []
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        response = b"".join(chunks)
        rhead, sep, rbody = response.partition(b"\r\n\r\n")
        rlines = [
            line for line in rhead.split(b"\r\n") if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join([*rlines, b"Connection: keep-alive"]) + sep + rbody


def _reset(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


class _Reader:
    """Cuts HTTP/1.1 requests (Content-Length or chunked bodies) off a socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.conn.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def request(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while b"\r\n0\r\n\r\n" not in rest and not rest.startswith(b"0\r\n\r\n"):
                if not self._fill():
                    return None
                head, _, rest = self.buf.partition(b"\r\n\r\n")
            end = rest.find(b"0\r\n\r\n") + 5
            body, self.buf = rest[:end], rest[end:]
        else:
            while len(rest) < length:
                if not self._fill():
                    return None
                head, _, rest = self.buf.partition(b"\r\n\r\n")
            body, self.buf = rest[:length], rest[length:]
        return head + b"\r\n\r\n" + body
