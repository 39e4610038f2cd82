"""Helpers for the kernel-client tests: a restartable daemon and its control socket.

The guest dials a fixed address whose host side reads the daemon's port from
a file at each connection (see portalbd/guest/relay.py), so the daemon may
come back on another port after a restart.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def control(sock_path: Path, request: object) -> Any:
    """One control request over the daemon's Unix socket (JSON lines)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed without a reply")
            buf += chunk
    return json.loads(buf)


class KernelDaemon:
    """A portalbd on 127.0.0.1 with file storage that a test can stop, kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port_file = workdir / "nbd.port"
        self.control_socket = workdir / "control.sock"
        self.log_path = workdir / "portalbd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> None:
        self.port = free_port()
        self.control_socket.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "portalbd.daemon",
            "--instance",
            "kernel",
            "--nbd-address",
            f"127.0.0.1:{self.port}",
            "--socket",
            str(self.control_socket),
            "--storage-url",
            f"file://{self.workdir / 'data'}",
            "--disk-size-gb",
            "1",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"portalbd exited: {self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if self.control_socket.exists():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("portalbd did not start listening within 60 s")
            time.sleep(0.1)
        self.port_file.write_text(f"{self.port}\n")

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/portalbd"

    def control(self, request: object) -> Any:
        return control(self.control_socket, request)

    def stats(self) -> dict[str, Any]:
        reply = self.control("Status")
        if "Status" not in reply:
            raise RuntimeError(f"Status failed: {reply}")
        stats: dict[str, Any] = reply["Status"]["stats"]
        return stats

    def read(self, offset: int, length: int) -> bytes:
        """Read through libnbd, as a second client next to the guest."""
        h = nbd.NBD()
        h.set_export_name("portalbd")
        h.connect_uri(self.uri)
        try:
            data: bytes = h.pread(length, offset)
        finally:
            h.shutdown()
        return data


def counter(stats: dict[str, Any], name: str) -> int:
    """A command counter (read, write, flush, trim, ...) or a top-level one (fua_writes)."""
    if name in stats.get("commands", {}):
        return int(stats["commands"][name])
    return int(stats.get(name, 0))
