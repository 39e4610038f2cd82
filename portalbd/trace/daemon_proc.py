"""Starting and stopping a `portalbd` daemon (and an S3 stand-in) as subprocesses.

`bench` and `gen` run the real daemon binary, configured through the same
flags and TOML a user would write, so what they measure is what ships.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from portalbd.control.client import request_once
from portalbd.control.errors import ControlError


class DaemonError(RuntimeError):
    """The daemon did not start or answer; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def portalbd_command() -> list[str]:
    """The daemon next to this interpreter (venv), else on PATH."""
    override = os.environ.get("PORTALBD_BIN")
    if override:
        return override.split()
    local = Path(sys.executable).parent / "portalbd"
    if local.exists():
        return [str(local)]
    found = shutil.which("portalbd")
    if found:
        return [found]
    raise DaemonError("cannot find the portalbd command (install portalbd or set PORTALBD_BIN)")


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    """The knobs bench sweeps; None leaves the daemon's default."""

    storage: str = "memory"
    block_size: int | None = None
    flush_interval_ms: int | None = None
    l0_sst_size: int | None = None
    max_unflushed_bytes: int | None = None
    compression: str | None = None

    def label(self) -> str:
        parts = [self.storage]
        if self.block_size is not None:
            parts.append(f"bs={_human(self.block_size)}")
        if self.flush_interval_ms is not None:
            parts.append(f"flush={self.flush_interval_ms}ms")
        if self.l0_sst_size is not None:
            parts.append(f"l0={_human(self.l0_sst_size)}")
        if self.max_unflushed_bytes is not None:
            parts.append(f"unflushed={_human(self.max_unflushed_bytes)}")
        if self.compression is not None:
            parts.append(f"comp={self.compression}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "block_size": self.block_size,
            "flush_interval_ms": self.flush_interval_ms,
            "l0_sst_size_bytes": self.l0_sst_size,
            "max_unflushed_bytes": self.max_unflushed_bytes,
            "compression_codec": self.compression,
        }


def _human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@dataclass(slots=True)
class MotoServer:
    """A local S3 endpoint (moto_server) with one bucket."""

    port: int
    process: subprocess.Popen[bytes]
    bucket: str = "portalbd-bench"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe) if exe.exists() else "moto_server"]
    port = free_port()
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MotoServer(port=port, process=proc)
    try:
        wait_port(port, proc, 30.0, "moto_server")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonError(f"{what} exited with status {proc.returncode} while starting")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DaemonError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass(slots=True)
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    control_socket: Path
    log_path: Path
    workdir: Path
    _log: TextIO | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def control(self, request: Any, timeout: float = 30.0) -> Any:
        return request_once(self.control_socket, request, timeout)

    def store_stats(self) -> dict[str, Any] | None:
        """`stats.store` from Status, or None if this daemon does not report it."""
        try:
            reply = self.control("Status")
        except ControlError:
            return None
        store = (
            reply.get("Status", {}).get("stats", {}).get("store")
            if isinstance(reply, dict)
            else None
        )
        return dict(store) if isinstance(store, dict) else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.process.returncode)


def daemon_args(
    cfg: DaemonConfig,
    workdir: Path,
    size_bytes: int,
    port: int,
    storage_url: str,
    trace: Path | None = None,
    workload: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    lsm: list[str] = []
    if cfg.l0_sst_size is not None:
        lsm.append(f"l0_sst_size_bytes = {cfg.l0_sst_size}")
    if cfg.max_unflushed_bytes is not None:
        lsm.append(f"max_unflushed_bytes = {cfg.max_unflushed_bytes}")
    if cfg.compression is not None:
        lsm.append(f"compression_codec = {json.dumps(cfg.compression)}")
    config_file = workdir / "portalbd.toml"
    config_file.write_text(("[lsm]\n" + "\n".join(lsm) + "\n") if lsm else "")
    args = [
        "-c", str(config_file),
        "--instance", f"trace-{port}",
        "--socket", str(workdir / "control.sock"),
        "--nbd-address", f"127.0.0.1:{port}",
        "--storage-url", storage_url,
        "--size-bytes", str(size_bytes),
    ]  # fmt: skip
    if cfg.block_size is not None:
        args += ["--block-size", str(cfg.block_size)]
    if cfg.flush_interval_ms is not None:
        args += ["--flush-interval-ms", str(cfg.flush_interval_ms)]
    if trace is not None:
        args += ["--trace", str(trace), "--workload", workload or "unnamed"]
    return [*args, *extra]


def storage_url_for(cfg: DaemonConfig, workdir: Path, s3: MotoServer | None) -> str:
    if cfg.storage == "memory":
        return "memory:///"
    if cfg.storage == "file":
        path = workdir / "data"
        path.mkdir(parents=True, exist_ok=True)
        return f"file://{path}"
    if cfg.storage == "s3":
        if s3 is None:
            raise DaemonError("s3 storage needs a moto_server (internal error)")
        return f"s3://{s3.bucket}/{workdir.name}"
    raise DaemonError(f"unknown storage {cfg.storage!r} (memory, file or s3)")


def start(
    cfg: DaemonConfig,
    workdir: Path,
    size_bytes: int,
    *,
    s3: MotoServer | None = None,
    trace: Path | None = None,
    workload: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 60.0,
) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = daemon_args(
        cfg, workdir, size_bytes, port, storage_url_for(cfg, workdir, s3), trace, workload, extra
    )
    env = dict(os.environ)
    if s3 is not None:
        env.update(s3.env())
    log_path = workdir / "portalbd.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by Daemon.stop
    proc = subprocess.Popen(
        [*portalbd_command(), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=workdir,
    )
    d = Daemon(proc, port, workdir / "control.sock", log_path, workdir, log)
    try:
        wait_port(port, proc, timeout, "portalbd")
        deadline = time.monotonic() + timeout
        while not d.control_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    except DaemonError as e:
        d.stop(5)
        raise DaemonError(f"{e}\n--- {log_path} ---\n{d.log_tail()}") from None
    return d
