"""Running real daemons (and a real S3 server) for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portalbd.control.client import request_once

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    port: int
    uri: str
    control_socket: Path
    log_path: Path
    storage_url: str | None
    args: list[str] = field(default_factory=list)

    def control(self, request: Any, timeout: float = 60) -> Any:
        return request_once(self.control_socket, request, timeout)

    def status(self) -> dict[str, Any]:
        response = self.control("Status")
        status: dict[str, Any] = response["Status"]
        return status

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the daemon flushes before it exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def daemon_command(*args: str) -> list[str]:
    return [str(BIN / "portalbd"), *args]


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
    """Start ``portalbd`` on a free port with its control socket in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    control = workdir / f"{instance}.sock"
    log_path = workdir / f"{instance}-{port}.log"
    args = [
        "--instance",
        instance,
        "--nbd-address",
        f"127.0.0.1:{port}",
        "--socket",
        str(control),
        "--log-level",
        "debug",
    ]
    if disk_size_gb is not None and not any(a.startswith("--size-bytes") for a in extra_args):
        args += ["--disk-size-gb", str(disk_size_gb)]
    if storage_url is not None:
        args += ["--storage-url", storage_url]
    args += list(extra_args)
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            daemon_command(*args), stdout=log_file, stderr=subprocess.STDOUT, env=full_env
        )
    daemon = RunningDaemon(
        process, port, f"nbd://127.0.0.1:{port}", control, log_path, storage_url, args
    )
    if wait:
        try:
            wait_for_port(port, process)
            deadline = time.monotonic() + 10
            while not control.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception as exc:
            daemon.kill()
            raise RuntimeError(f"daemon failed to start: {exc}\n{daemon.log()}") from exc
    return daemon


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
