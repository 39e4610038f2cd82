"""Helpers for the kernel-client tests: a restartable daemon and its control socket.

The guest dials a fixed address whose host side reads the daemon's port from
a file at each connection (see portalbd/guest/relay.py), so the daemon may
come back on another port after a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbd

from tests.support import RunningDaemon, start_daemon


class KernelDaemon:
    """A portalbd (tests.support.start_daemon, file storage) that a test can kill and restart."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        self.workdir = workdir
        self.extra_args = extra_args  # daemon flags, e.g. TLS
        self.port_file = workdir / "nbd.port"
        self.daemon: RunningDaemon | None = None
        self.starts = 0

    def start(self) -> None:
        self.daemon = start_daemon(
            self.workdir,
            *self.extra_args,
            storage_url=f"file://{self.workdir / 'data'}",
            instance="kernel",
        )
        self.starts += 1
        self.port_file.write_text(f"{self.daemon.port}\n")

    @property
    def running(self) -> RunningDaemon:
        if self.daemon is None:
            raise RuntimeError("the daemon is not running")
        return self.daemon

    @property
    def port(self) -> int:
        return self.running.port

    def stop(self, *, kill: bool = False) -> None:
        if self.daemon is None:
            return
        if kill:
            self.daemon.kill()
        else:
            self.daemon.stop()
        self.daemon = None

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/portalbd"

    def control(self, request: object) -> Any:
        return self.running.control(request)

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
