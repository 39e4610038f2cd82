"""Byte relay between one guest TCP connection and the host's NBD server.

qemu's user network runs this once per connection the guest opens to the
forwarded address (`guestfwd=...-cmd:`), with that connection on fds 0-2.
It dials the host server and copies bytes both ways until either side closes,
then exits, so the guest sees the server's disconnects as its own.

qemu has accepted the guest's connection before this runs, so a refused dial
cannot be shown to the guest as a refusal: nbd-client would read EOF in its
handshake and give up instead of retrying. The relay therefore keeps dialing
for a while (as TCP would keep retrying a SYN), which is what lets a
`-persist` client ride out a daemon restart.

Run as a file (`python3 -I -S relay.py HOST PORT`): it must start fast and
must never write to stderr, which is the guest's socket. PORT may be
`@FILE`: the port is then read from FILE at each connection, so a test can
restart its server on another port while the guest stays up.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

BUFFER = 1 << 20
DIAL_SECONDS = 30.0


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(BUFFER)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    # Either direction ending ends the connection: NBD has no half-close.
    os._exit(0)


def _dial(host: str, port: int, deadline: float) -> socket.socket | None:
    while True:
        try:
            server = socket.create_connection((host, port), timeout=10)
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
            continue
        server.settimeout(None)
        return server


def main(argv: list[str]) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    host = argv[1]
    try:
        spec = argv[2]
        port = int(Path(spec[1:]).read_text().strip() if spec[0] == "@" else spec)
    except (OSError, ValueError):
        os._exit(1)
    dial_seconds = float(argv[3]) if len(argv) > 3 else DIAL_SECONDS
    guest = socket.socket(fileno=0)
    server = _dial(host, port, time.monotonic() + dial_seconds)
    if server is None:
        os._exit(1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_pump, args=(server, guest), daemon=True).start()
    _pump(guest, server)


if __name__ == "__main__":
    main(sys.argv)
