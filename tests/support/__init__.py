"""Running real daemons (and a real S3 server) for tests: `portalbd.launch`, test defaults."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from portalbd.launch import Daemon, portalbd_command, start
from portalbd.launch import free_port as free_port
from portalbd.launch import wait_for_port as wait_for_port

RunningDaemon = Daemon  # the name the tests know it by
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def daemon_command(*args: str) -> list[str]:
    return [*portalbd_command(), *args]


def start_daemon(
    workdir: Path,
    *extra_args: str,
    storage_url: str | None = None,
    disk_size_gb: int | None = 1,
    instance: str = "t",
    port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> RunningDaemon:
    """`portalbd.launch.start` with a debug log, which tests read to see what happened."""
    return start(
        workdir,
        *extra_args,
        storage_url=storage_url,
        disk_size_gb=disk_size_gb,
        instance=instance,
        port=port,
        env=env,
        log_level="debug",
        wait=wait,
    )


class Wire:
    """One raw connection to a control socket: send bytes, read answer lines.

    No client library on purpose: the wire tests check bytes, and send what
    no client would.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; partial {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def ask(self, data: bytes) -> bytes:
        self.send(data)
        return self.line()

    def close(self) -> None:
        self.sock.close()


def run_portalbd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the daemon binary to completion (for CLI error tests)."""
    return subprocess.run(
        daemon_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def nbd_handle(uri: str) -> Any:
    """A connected libnbd handle (Debian's python3-libnbd)."""
    import nbd

    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


@contextlib.contextmanager
def connected(uri: str) -> Any:
    handle = nbd_handle(uri)
    try:
        yield handle
    finally:
        with contextlib.suppress(Exception):
            handle.shutdown()
        # libnbd's Python handle has no close(): it is freed with the object.
        del handle


def proc_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM): what the real process costs."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")
