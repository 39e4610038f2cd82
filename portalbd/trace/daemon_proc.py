"""The daemons `bench` and `gen` run: the knobs they sweep, as flags and TOML.

They run the real daemon (`portalbd.launch`), configured through the same
flags and TOML a user would write, so what they measure is what ships.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portalbd.control.errors import ControlError
from portalbd.launch import (
    Daemon,
    LaunchError,
    MotoServer,
    free_port,
    launch,
    moto_server,
    portalbd_command,
)


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


BUCKET = "portalbd-bench"


@contextlib.contextmanager
def s3_server() -> Iterator[MotoServer]:
    """A local moto S3 with the bench's bucket; gone afterwards."""
    with moto_server() as server:
        server.create_bucket(BUCKET)
        yield server


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
            raise LaunchError("s3 storage needs a moto_server (internal error)")
        return f"s3://{BUCKET}/{workdir.name}"
    raise LaunchError(f"unknown storage {cfg.storage!r} (memory, file or s3)")


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
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """`env` adds to the daemon's environment (provenance.tree_env: another checkout's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage_url = storage_url_for(cfg, workdir, s3)
    args = daemon_args(cfg, workdir, size_bytes, port, storage_url, trace, workload, extra)
    log_path = workdir / "portalbd.log"
    log_path.unlink(missing_ok=True)  # one daemon per workdir: its log alone
    return launch(
        args,
        port=port,
        control_socket=workdir / "control.sock",
        log_path=log_path,
        env=daemon_env(workdir, s3, env),
        cwd=workdir,
        storage_url=storage_url,
        timeout=timeout,
    )


def daemon_env(
    workdir: Path, s3: MotoServer | None, env: Mapping[str, str] | None
) -> dict[str, str]:
    # a benchmark daemon's object cache is part of its run, not the host's
    return {
        "CACHE_DIRECTORY": str(workdir / "object-cache"),
        **(s3.env() if s3 else {}),
        **(env or {}),
    }


def settings(daemon: Daemon, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The settings `daemon` runs with, as its own `--print-config` resolves them.

    Asked of the same daemon program with the same arguments, so a baseline
    checkout reports its own defaults; None if it cannot say (an older
    daemon, a PORTALBD_BIN without the flag).
    """
    try:
        out = subprocess.run(
            [*portalbd_command(), *daemon.args, "--print-config"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return tomllib.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, tomllib.TOMLDecodeError):
        return None


def version(daemon: Daemon) -> str | None:
    """The version the running daemon reports in Status (its own, not this tool's)."""
    try:
        reply = daemon.control("Status", timeout=30)
    except ControlError:
        return None
    found = reply.get("Status", {}).get("version") if isinstance(reply, dict) else None
    return str(found) if found is not None else None


def store_stats(daemon: Daemon) -> dict[str, Any] | None:
    """`stats.store` from Status, or None if this daemon does not report it."""
    try:
        reply = daemon.control("Status", timeout=30)
    except ControlError:
        return None
    store = (
        reply.get("Status", {}).get("stats", {}).get("store") if isinstance(reply, dict) else None
    )
    return dict(store) if isinstance(store, dict) else None
