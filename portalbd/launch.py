"""Starting portalbd daemons, and a local S3 server, as child processes.

Tests, benchmarks and the trace tools all run the real daemon the way a user
would (flags, TOML, environment), so they share one way to find it, start it,
know when it is ready and stop it, with its log in every error:

- `portalbd_command`: the daemon of the Python running us (or ``$PORTALBD_BIN``).
- `launch`: start it with given arguments; ready once its NBD port listens and
  its control socket exists. `start` builds the usual arguments first.
- `MotoServer`: ``moto_server`` on a free port, ready once it answers S3.

Waiting until ready and stopping with a grace period each have one
implementation here, with a blocking face (tests, benchmarks, traces) and
an asyncio face (the CSI supervisor and attacher, which must not block their
loop): the same deadlines, the same checks for a child that died, the same
error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from portalbd.control.client import ControlClient, request_once

POLL_S = 0.05


class LaunchError(RuntimeError):
    """A child did not start or stop as it should; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def portalbd_command() -> list[str]:
    """The daemon of this very install: ``python -m portalbd.daemon``, or ``$PORTALBD_BIN``.

    The interpreter running us has the package (the CSI driver always
    started its daemons so), while a ``portalbd`` found on PATH might be
    another version. ``$PORTALBD_BIN`` (split on spaces) runs another build
    on purpose.
    """
    override = os.environ.get("PORTALBD_BIN")
    if override:
        return override.split()
    return [sys.executable, "-m", "portalbd.daemon"]


def tool(name: str) -> str:
    """A console script of this environment (moto_server, ...), else the bare name for PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class _Patience:
    """When to give up waiting for a child: it exited, or ``timeout`` passed.

    The one rule behind both faces of waiting; ``exited`` gives the child's
    exit status once it has one (None: still running, or nothing to watch).
    """

    def __init__(self, exited: Callable[[], int | None], timeout: float, what: str) -> None:
        self.exited = exited
        self.timeout = timeout
        self.what = what
        self.deadline = time.monotonic() + timeout

    def check(self) -> None:
        status = self.exited()
        if status is not None:
            raise LaunchError(f"{self.what} exited with status {status} while starting")
        if time.monotonic() > self.deadline:
            raise LaunchError(f"{self.what} was not ready within {self.timeout:g}s")


def _never_exits() -> int | None:
    return None


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes] | None,
    timeout: float,
    what: str,
    poll_s: float = POLL_S,
) -> None:
    """Poll ``ready`` until it holds; fail early if ``process`` exits meanwhile."""
    patience = _Patience(process.poll if process is not None else _never_exits, timeout, what)
    while not ready():
        patience.check()
        time.sleep(poll_s)


async def wait_until_async(
    ready: Callable[[], bool | Awaitable[bool]],
    exited: Callable[[], int | None] | None,
    timeout: float,  # noqa: ASYNC109 (the sync face's deadline, named in its errors)
    what: str,
    poll_s: float = POLL_S,
) -> None:
    """`wait_until` for asyncio code: ``ready`` may be a coroutine function.

    ``exited`` is the child's status (``lambda: process.returncode`` for an
    asyncio child; None to watch no child).
    """
    patience = _Patience(exited or _never_exits, timeout, what)
    while True:
        answer = ready()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return
        patience.check()
        await asyncio.sleep(poll_s)


def listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    return check


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], timeout: float = 30, what: str = "the server"
) -> None:
    wait_until(listening(port), process, timeout, f"{what} (port {port})")


def spawn(
    argv: Sequence[str],
    log_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_path`` (None: discarded)."""
    full_env = {**os.environ, **(env or {})}
    out: IO[bytes] | int
    with contextlib.ExitStack() as stack:
        out = subprocess.DEVNULL if log_path is None else stack.enter_context(open(log_path, "ab"))
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=new_session,
        )


async def spawn_async(
    argv: Sequence[str], log_path: Path, *, new_session: bool = False
) -> asyncio.subprocess.Process:
    """`spawn` for asyncio code: output appended to ``log_path``, no stdin."""
    with open(log_path, "ab") as out:  # noqa: ASYNC230 (opening a local file is instant)
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=new_session,
        )


def _ignored_sigterm(what: str, timeout: float) -> LaunchError:
    return LaunchError(f"{what} did not exit within {timeout:g}s of SIGTERM; killed")


def stop_process(process: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """SIGTERM and wait (a daemon flushes before it exits); SIGKILL and fail after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise _ignored_sigterm(what, timeout) from None
    return int(process.returncode)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs: for a process we did not start (so cannot wait for).

    A zombie does not: it only waits for its parent to collect its status,
    and an orphan's parent (PID 1 here, or a driver in a container) may do
    that seconds later, or never."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


async def stop_async(
    pid: int,
    gone: Callable[[], bool],
    timeout: float,  # noqa: ASYNC109 (the grace period, named in the error)
    what: str,
    poll_s: float = POLL_S,
) -> None:
    """`stop_process` for asyncio code, also for a pid that is not our child.

    ``gone`` says whether it has exited (``process.returncode is not None``
    for our child, ``not pid_alive(pid)`` for an adopted one). Reap our own
    child afterwards with ``await process.wait()`` for its status.
    """
    if gone():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise _ignored_sigterm(what, timeout)
        await asyncio.sleep(poll_s)


@contextlib.contextmanager
def serving(
    argv: Sequence[str], port: int, log_path: Path | None, *, what: str, stop_timeout: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """Another TCP server (nbdkit, ...) for the length of a ``with``: up once ``port`` listens."""
    process = spawn(argv, log_path)
    try:
        wait_for_port(port, process, 60, what)
        yield process
    finally:
        with contextlib.suppress(LaunchError):  # killed after the grace period: nothing to add
            stop_process(process, stop_timeout, what)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Daemon:
    """A running portalbd: where it serves, where it logs, how to talk to it."""

    process: subprocess.Popen[bytes]
    port: int
    control_socket: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    storage_url: str | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def control(self, request: Any, timeout: float = 60) -> Any:
        """One request; the reply as decoded, ``{"Error": ...}`` included."""
        return request_once(self.control_socket, request, timeout)

    def status(self) -> dict[str, Any]:
        with ControlClient(self.control_socket, 60) as client:
            return client.status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the daemon flushes before it exits. Its exit status."""
        return stop_process(self.process, timeout, f"portalbd (pid {self.process.pid})")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def launch(
    args: Sequence[str],
    *,
    port: int,
    control_socket: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    storage_url: str | None = None,
    wait: bool = True,
    timeout: float = 60,
) -> Daemon:
    """Run the daemon with ``args`` (which name ``port`` and ``control_socket``).

    With ``wait``, return once the NBD port listens and the control socket
    exists; if that does not happen the daemon is killed and the error
    carries the end of its log.
    """
    process = spawn([*portalbd_command(), *args], log_path, env=env, cwd=cwd)
    daemon = Daemon(process, port, control_socket, log_path, list(args), storage_url)
    if wait:
        try:
            wait_for_port(port, process, timeout, "portalbd")
            wait_until(control_socket.exists, process, timeout, "portalbd's control socket")
        except LaunchError as exc:
            daemon.kill()
            raise LaunchError(f"{exc}\n--- {log_path} ---\n{daemon.log_tail()}") from None
    return daemon


def _flag_value(args: Sequence[str], flag: str) -> Path | None:
    """The last ``flag VALUE`` or ``flag=VALUE`` in ``args`` (the one the daemon obeys)."""
    found: Path | None = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = Path(args[i + 1])
        elif arg.startswith(flag + "="):
            found = Path(arg.partition("=")[2])
    return found


def start(
    workdir: Path,
    *extra_args: str,
    storage_url: str | None = None,
    disk_size_gb: int | None = 1,
    instance: str = "t",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str | None = None,
    wait: bool = True,
) -> Daemon:
    """A daemon on a free port with its control socket and log in ``workdir``.

    ``extra_args`` come last, so they override; a ``--socket`` among them is
    the control socket waited for.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    control = _flag_value(extra_args, "--socket") or workdir / f"{instance}.sock"
    args = ["--instance", instance, "--nbd-address", f"127.0.0.1:{port}", "--socket", str(control)]
    if log_level is not None:
        args += ["--log-level", log_level]
    if disk_size_gb is not None and not any(a.startswith("--size-bytes") for a in extra_args):
        args += ["--disk-size-gb", str(disk_size_gb)]
    if storage_url is not None:
        args += ["--storage-url", storage_url]
    args += extra_args
    log_path = workdir / f"{instance}-{port}.log"
    # an S3 disk's local object cache stays in the work directory, never in
    # the host's /var/cache or ~/.cache
    env = {"CACHE_DIRECTORY": str(workdir / "object-cache" / instance), **(env or {})}
    return launch(
        args,
        port=port,
        control_socket=control,
        log_path=log_path,
        env=env,
        storage_url=storage_url,
        wait=wait,
    )


# --- a local S3 -------------------------------------------------------------

ACCESS_KEY = "portalbd-test-key"
SECRET_KEY = "portalbd-test-secret-do-not-log"
REGION = "us-east-1"


class MotoServer:
    """``moto_server`` on a free port; in-memory, so every run starts empty.

    With ``auth`` every request is checked against moto's IAM (unknown keys
    get 403). ``pause``/``resume`` freeze it like a network partition.
    """

    def __init__(self, log_dir: Path | None = None, *, auth: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = None if log_dir is None else log_dir / f"moto-{self.port}.log"
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {}
        self.process = spawn(
            [tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            self.log_path,
            env=env,
            new_session=True,
        )
        try:
            wait_for_port(self.port, self.process, 30, "moto_server")
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30) -> None:
        wait_until(self._answers, self.process, timeout, "moto_server", poll_s=0.1)

    def _answers(self) -> bool:
        try:
            self.client().list_buckets()
        except Exception as exc:
            # auth mode: answering (with a refusal) is enough
            return "403" in str(exc) or "InvalidAccessKeyId" in str(exc)
        return True

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        out: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a daemon needs in its environment to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            with contextlib.suppress(LaunchError):  # killed after the grace period: fine
                stop_process(self.process, 10, "moto_server")


@contextlib.contextmanager
def moto_server(log_dir: Path | None = None, *, auth: bool = False) -> Iterator[MotoServer]:
    server = MotoServer(log_dir, auth=auth)
    try:
        yield server
    finally:
        server.stop()
