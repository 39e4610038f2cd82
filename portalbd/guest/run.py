"""Boot the guest with a shell script and collect what the script reports.

The guest reaches the host server only through qemu's user network with
``restrict=on``: one forwarded address (10.0.2.100:10809 inside the guest)
whose every connection runs relay.py to 127.0.0.1:PORT on the host. Nothing
else leaves qemu.

The script talks back over a serial port (see scripts.py): named result
sections, host calls answered by a Python callback while the guest waits (so
a test can restart the daemon or take a snapshot at an exact point of the
guest's workload), and its exit status. qemu is always killed, on timeout,
on error, and when the guest has powered off.
"""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from portalbd.guest import relay, scripts
from portalbd.guest.build import GuestImage, build_image
from portalbd.launch import spawn

# A host call handler gets the call's words (name first) and returns the reply
# line; raising makes the guest's `hostcall` fail with the exception's message.
CallHandler = Callable[[list[str]], str]


class GuestError(RuntimeError):
    """The guest run failed (timeout, qemu error or a failing script)."""


@dataclass
class GuestResult:
    """What one guest run reported."""

    exit_status: int | None
    sections: dict[str, str] = field(default_factory=dict)
    output: str = ""
    console: str = ""
    boot_seconds: float | None = None
    guest_script_seconds: float | None = None
    elapsed: float = 0.0
    timed_out: bool = False
    call_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out and not self.call_errors

    def step_status(self, name: str) -> int | None:
        """Exit status of the guest's `step NAME ...`, None when it never finished."""
        text = self.sections.get(f"status:{name}")
        return int(text) if text is not None and text.strip().isdigit() else None

    def describe(self, tail: int = 4000) -> str:
        """A failure summary: status and the end of the script's and the kernel's output."""
        return (
            f"guest exit status {self.exit_status}, timed out: {self.timed_out}, "
            f"host call errors: {self.call_errors}\n"
            f"--- script output (tail) ---\n{self.output[-tail:]}\n"
            f"--- console (tail) ---\n{self.console[-tail:]}"
        )

    def check(self) -> GuestResult:
        """Return self, or raise GuestError describing what went wrong."""
        if not self.ok:
            raise GuestError(self.describe())
        return self


def _qemu_escape(value: str) -> str:
    """qemu's option parser splits on commas; a literal comma is written twice."""
    return value.replace(",", ",,")


class GuestRunner:
    """Boots the kernel-client guest; one instance can run many scripts in turn."""

    def __init__(
        self,
        image: GuestImage | None = None,
        *,
        memory_mb: int = 512,
        cpus: int = 1,
        qemu: str = "qemu-system-x86_64",
        keep_dir: Path | None = None,
    ) -> None:
        self.image = image or build_image()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.qemu = qemu
        self.keep_dir = keep_dir

    def command(
        self, workdir: Path, nbd_port: int | Path, nbd_host: str = "127.0.0.1"
    ) -> list[str]:
        port = f"@{nbd_port}" if isinstance(nbd_port, Path) else str(nbd_port)
        relay_cmd = f"{sys.executable} -I -S {relay.__file__} {nbd_host} {port}"
        fwd = f"tcp:{scripts.GUEST_NBD_HOST}:{scripts.GUEST_NBD_PORT}-cmd:{relay_cmd}"
        return [
            self.qemu,
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mb),
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            "console=ttyS0 quiet loglevel=4 panic=-1 nbd.nbds_max=4",
            "-fw_cfg",
            f"name={scripts.SCRIPT_FW_CFG},file={_qemu_escape(str(workdir / 'script.sh'))}",
            "-chardev",
            f"file,id=console,path={_qemu_escape(str(workdir / 'console.log'))}",
            "-serial",
            "chardev:console",
            "-chardev",
            f"socket,id=ctl,path={_qemu_escape(str(workdir / 'ctl.sock'))}",
            "-serial",
            "chardev:ctl",
            "-chardev",
            f"file,id=out,path={_qemu_escape(str(workdir / 'output.log'))}",
            "-serial",
            "chardev:out",
            "-netdev",
            f"user,id=n0,restrict=on,guestfwd={_qemu_escape(fwd)}",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]

    def run(
        self,
        script: str,
        nbd_port: int | Path,
        timeout: float = 180.0,
        *,
        on_call: CallHandler | None = None,
        nbd_host: str = "127.0.0.1",
    ) -> GuestResult:
        """Boot, run `script` (busybox sh, guest_lib helpers loaded), return its report.

        Inside the guest `$NBD_HOST $NBD_PORT` reach nbd_host:nbd_port on the
        host; `attach /dev/nbd0 -N portalbd` is nbd-client with them. A Path
        as nbd_port names a file holding the port, read at each connection.
        The run never outlives `timeout` seconds.
        """
        workdir = Path(tempfile.mkdtemp(prefix="pbdguest-"))
        try:
            (workdir / "script.sh").write_text(script)
            return self._run_in(workdir, nbd_port, nbd_host, timeout, on_call)
        finally:
            if self.keep_dir is not None:
                shutil.copytree(
                    workdir,
                    self.keep_dir,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.sock"),
                )
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(
        self,
        workdir: Path,
        nbd_port: int | Path,
        nbd_host: str,
        timeout: float,
        on_call: CallHandler | None,
    ) -> GuestResult:
        start = time.monotonic()
        deadline = start + timeout
        result = GuestResult(exit_status=None)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(workdir / "ctl.sock"))
        listener.listen(1)
        proc = spawn(
            self.command(workdir, nbd_port, nbd_host), workdir / "qemu.err", new_session=True
        )
        try:
            conn = self._accept(listener, proc, deadline)
            if conn is not None:
                with conn:
                    self._converse(conn, proc, result, start, deadline, on_call)
            # After @@EXIT the guest only syncs and powers off.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, min(15.0, deadline - time.monotonic())))
            if proc.poll() is None and result.exit_status is None:
                result.timed_out = True
        finally:
            self._kill(proc)
            listener.close()
        result.elapsed = time.monotonic() - start
        result.output = _read_text(workdir / "output.log")
        result.console = _read_text(workdir / "console.log")
        if proc.returncode not in (0, None) and result.exit_status is None:
            result.console += "\n--- qemu stderr ---\n" + _read_text(workdir / "qemu.err")
        return result

    @staticmethod
    def _accept(
        listener: socket.socket, proc: subprocess.Popen[bytes], deadline: float
    ) -> socket.socket | None:
        listener.settimeout(0.2)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(False)
            return conn
        return None

    @staticmethod
    def _converse(
        conn: socket.socket,
        proc: subprocess.Popen[bytes],
        result: GuestResult,
        start: float,
        deadline: float,
        on_call: CallHandler | None,
    ) -> None:
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ)
        buf = b""
        section: tuple[str, list[bytes]] | None = None
        ready_uptime: float | None = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.timed_out = True
                    return
                if not sel.select(timeout=min(remaining, 0.5)):
                    if proc.poll() is not None:
                        return
                    continue
                try:
                    chunk = conn.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.rstrip(b"\r")
                    if section is not None:
                        if line == b"@@END " + section[0].encode():
                            data = base64.b64decode(b"".join(section[1]))
                            result.sections[section[0]] = data.decode(errors="replace")
                            section = None
                        else:
                            section[1].append(line)
                        continue
                    text = line.decode(errors="replace")
                    if text.startswith("@@BEGIN "):
                        section = (text[len("@@BEGIN ") :], [])
                    elif text.startswith("@@READY"):
                        result.boot_seconds = time.monotonic() - start
                        ready_uptime = _float_word(text, 1)
                    elif text.startswith("@@CALL "):
                        reply = _answer(text[len("@@CALL ") :].split(), on_call, result)
                        conn.setblocking(True)
                        conn.sendall(reply.encode() + b"\n")
                        conn.setblocking(False)
                    elif text.startswith("@@EXIT "):
                        result.exit_status = int(text.split()[1])
                        end_uptime = _float_word(text, 2)
                        if ready_uptime is not None and end_uptime is not None:
                            result.guest_script_seconds = end_uptime - ready_uptime
                        return
        finally:
            sel.close()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _answer(words: list[str], on_call: CallHandler | None, result: GuestResult) -> str:
    if not words:
        return "@@ERR empty host call"
    if on_call is None:
        result.call_errors.append(f"{words[0]}: no host call handler")
        return "@@ERR no host call handler"
    try:
        reply = on_call(words)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        result.call_errors.append(f"{words[0]}: {message}")
        return "@@ERR " + message
    return "@@OK " + reply.replace("\n", " ")


def _float_word(text: str, index: int) -> float | None:
    words = text.split()
    try:
        return float(words[index])
    except (IndexError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""
