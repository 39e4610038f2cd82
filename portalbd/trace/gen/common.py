"""What every workload generator shares: a recording server, a block device, cleanup.

The kernel has no NBD module here, so the workload reaches the server the way
TESTING.md describes: `nbdfuse` exposes the export as a file, `losetup` turns
that file into a block device, and real mkfs / mount / applications use it.
Every resource is pushed onto an ExitStack as soon as it exists, so a failing
or interrupted workload still unmounts, detaches, unmounts FUSE and stops the
servers, in reverse order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sh

from portalbd.launch import (
    LaunchError,
    free_port,
    log_tail,
    serving,
    spawn,
    stop_process,
    wait_until,
)
from portalbd.trace import daemon_proc, nbdkit_log
from portalbd.trace.daemon_proc import DaemonConfig

GIB = 1 << 30


class GenError(RuntimeError):
    """A workload step failed; the message names the step and its output."""


def log(msg: str) -> None:
    print(f"gen: {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], *, timeout: float = 600, check: bool = True,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> str:  # fmt: skip
    """Run a command (through ``sh``); on failure raise GenError with its output."""
    try:
        program = sh.Command(cmd[0])
    except sh.CommandNotFound:
        raise GenError(f"{cmd[0]}: command not found (see docs/traces.md for packages)") from None
    try:
        result = program(
            *cmd[1:],
            _timeout=timeout,
            _env=env,
            _cwd=str(cwd) if cwd is not None else None,
            _ok_code=[0] if check else list(range(256)),
            _return_cmd=True,
        )
    except sh.TimeoutException:
        raise GenError(f"{' '.join(cmd)}: timed out after {timeout:.0f}s") from None
    except sh.ErrorReturnCode as e:
        out = (e.stdout + e.stderr).decode(errors="replace").strip()[-2000:]
        raise GenError(f"{' '.join(cmd)} failed with status {e.exit_code}:\n{out}") from None
    return str(result)


def _quiet(fn: Callable[[], object], what: str) -> Callable[[], None]:
    """A cleanup step that reports, but never raises (the next step must still run)."""

    def step() -> None:
        try:
            fn()
        except Exception as e:
            log(f"cleanup: {what}: {e}")

    return step


@dataclass(slots=True)
class Target:
    uri: str
    finish: Callable[[], None]  # stop recording and produce the trace file


def recording_server(
    stack: contextlib.ExitStack,
    server: str,
    workdir: Path,
    out: Path,
    workload: str,
    size: int,
    block_size: int | None,
) -> Target:
    """Start portalbd (or nbdkit + log filter) recording to `out`."""
    if server == "portalbd":
        d = daemon_proc.start(
            DaemonConfig(storage="memory", block_size=block_size),
            workdir / "daemon",
            size,
            trace=out.resolve(),
            workload=workload,
        )
        stopped = False

        def finish() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                rc = d.stop()
                if rc != 0:
                    raise GenError(f"portalbd exited with status {rc}\n{d.log_tail()}")
                if not out.exists():
                    raise GenError(f"portalbd wrote no trace to {out}\n{d.log_tail()}")

        stack.callback(_quiet(d.stop, "stop portalbd"))
        return Target(d.uri, finish)
    if server == "nbdkit":
        port = free_port()
        logfile = workdir / "nbdkit.log"
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=log",
                "memory", str(size), f"logfile={logfile}"]  # fmt: skip
        proc = stack.enter_context(
            serving(argv, port, workdir / "nbdkit.out", what="nbdkit", stop_timeout=30)
        )

        def stop() -> None:
            stop_process(proc, 30, "nbdkit")  # before its request log is read

        def finish_nbdkit() -> None:
            stop()
            n = nbdkit_log.to_trace(logfile, out, workload, size)
            log(f"converted {n} logged requests")

        return Target(f"nbd://127.0.0.1:{port}", finish_nbdkit)
    raise GenError(f"unknown server {server!r}")


def attach(stack: contextlib.ExitStack, uri: str, workdir: Path) -> Path:
    """nbdfuse + loop device for `uri`; returns the loop device path."""
    fusedir = workdir / "fuse"
    fusedir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "nbdfuse.pid"
    proc = spawn(
        ["nbdfuse", "-P", str(pidfile), str(fusedir / "disk"), uri], workdir / "nbdfuse.log"
    )

    def unmount_fuse() -> None:
        if proc.poll() is None:
            run(["fusermount3", "-u", str(fusedir)], timeout=60, check=False)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(_quiet(unmount_fuse, "fusermount3 -u"))
    try:
        wait_until(pidfile.exists, proc, 30, "nbdfuse")
    except LaunchError:
        if proc.poll() is None:
            raise GenError("nbdfuse did not become ready within 30s") from None
        err = log_tail(workdir / "nbdfuse.log")
        raise GenError(f"nbdfuse exited with status {proc.returncode}: {err.strip()}") from None
    loop = run(["losetup", "-f", "--show", str(fusedir / "disk")]).strip()
    stack.callback(_quiet(lambda: run(["losetup", "-d", loop]), f"losetup -d {loop}"))
    log(f"{uri} attached as {loop}")
    return Path(loop)


@contextlib.contextmanager
def mounted(device: Path, mountpoint: Path, options: str = "") -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", *(["-o", options] if options else []), str(device), str(mountpoint)])
    try:
        yield mountpoint
    finally:
        run(["sync"], check=False)
        try:
            run(["umount", str(mountpoint)])
        except GenError:
            time.sleep(1)
            run(["umount", "-l", str(mountpoint)], check=False)


@dataclass(slots=True, kw_only=True)
class GenContext:
    workdir: Path
    device: Path
    quick: bool
    size: int


Workload = Callable[[GenContext], None]


def check_tools(names: Sequence[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise GenError(f"missing tools: {', '.join(missing)} (see docs/traces.md)")
    if os.geteuid() != 0:
        raise GenError("gen needs root (losetup, mount)")
