"""Streams every NBD request the daemon serves into a trace file.

`request_done` runs on the daemon's event loop once per request, so it only
appends a tuple to a deque (thread-safe, no lock, no syscall).  A writer
thread wakes every 100 ms, turns what accumulated into JSON lines
and writes them through the (optional) compressor, which releases the GIL
while it works.  Memory is bounded: past `max_pending` unwritten records new
ones are dropped and counted (the footer says how many) rather than stalling
the loop or growing without limit; at the rates a Python server reaches the
writer keeps up by a wide margin.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import IO, cast

import zstandard

from portalbd.private import shared_mode
from portalbd.trace.format import (
    OP_NAMES,
    TraceFooter,
    TraceHeader,
    _ClosingGzipTarget,
    json_line,
    now_iso,
)

log = logging.getLogger(__name__)

_RECORD = (
    '{"seq":%d,"ts_ns":%d,"conn":%d,"type":"%s","offset":%d,"length":%d,'
    '"flags":%d,"duration_ns":%d,"error":%d}\n'
)

_Pending = tuple[int, int, int, int, int, int, int, int]

TRACE_DIR_NAME = "traces"


def trace_dir_for(control_socket: Path, env: Mapping[str, str] | None = None) -> Path:
    """The one directory control-socket clients may record traces into.

    Under systemd (``STATE_DIRECTORY`` set) it is ``traces/`` in the unit's
    first state directory: persistent, on disk rather than in /run's RAM,
    and owned by the daemon's user. Otherwise ``traces/`` next to the
    control socket, which is the instance's own runtime directory by
    default (``/run/portalbd/<instance>/``).
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / TRACE_DIR_NAME
    return control_socket.parent / TRACE_DIR_NAME


class TracePathError(OSError):
    """A trace file the daemon refuses to create; the message says why.

    An OSError, so that startup (which reports OSError as "startup failed")
    and the control handler treat it like any other file that cannot be made.
    """


# No O_NONBLOCK: a FIFO planted by the operator blocks as it always did.
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def confine_trace_name(trace_dir: Path, requested: str) -> str:
    """The file name inside `trace_dir` that `requested` stands for.

    A control client names a trace by a plain file name (created in the
    trace directory) or by an absolute path directly in that directory.
    Anything else is refused, before any file system call: an absolute path
    elsewhere, a relative path with a directory part ('..' included), NUL.
    The comparison is lexical; symlinks are dealt with when opening.
    """
    if os.path.isabs(requested):
        parent, name = os.path.split(os.path.normpath(requested))
        if os.path.normpath(parent) != os.path.normpath(trace_dir):
            raise TracePathError(
                f"trace path {requested!r} is outside this instance's trace directory "
                f"{str(trace_dir)!r}; give a file name, which is created there"
            )
        requested = name
    if not requested or "/" in requested or "\0" in requested or requested in (".", ".."):
        raise TracePathError(
            f"trace name {requested!r} must be a single file name inside "
            f"{str(trace_dir)!r} (no '/', not '.' or '..')"
        )
    return requested


def _open_trace_dir(trace_dir: Path) -> int:
    """A descriptor of `trace_dir`, created 0750 if missing, never through a symlink."""
    try:
        os.mkdir(trace_dir, 0o750)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TracePathError(
            f"cannot create trace directory {str(trace_dir)!r}: {exc.strerror}"
        ) from None
    else:
        os.chmod(trace_dir, shared_mode(0o750))
    try:
        return os.open(trace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        reason = exc.strerror
        # O_DIRECTORY wins over O_NOFOLLOW on Linux: a symlink gives ENOTDIR.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and trace_dir.is_symlink():
            reason = "it is a symlink; portalbd does not follow one"
        raise TracePathError(f"cannot use trace directory {str(trace_dir)!r}: {reason}") from None


def _compressing(raw: IO[bytes], name: str) -> IO[bytes]:
    """Wrap an already opened file as `format.open_write` would for this name.

    `open_write` opens by path (following symlinks, truncating); the
    recorder opens the descriptor itself, so it only borrows the naming rule.
    """
    if name.endswith((".zst", ".zstd")):
        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
    if name.endswith(".gz"):
        gz = gzip.GzipFile(fileobj=_ClosingGzipTarget(raw), mode="wb", compresslevel=6)
        return cast(IO[bytes], gz)
    return raw


class TraceRecorder:
    """One recording session: open, feed `request_done`, `close`."""

    def __init__(
        self,
        stream: IO[bytes],
        path: Path,
        workload: str,
        device_size_bytes: int,
        *,
        max_pending: int = 1 << 18,
        interval_s: float = 0.1,
    ) -> None:
        self.path = path
        self.workload = workload
        self.device_size_bytes = device_size_bytes
        self._stream = stream
        self._start_ns = time.monotonic_ns()
        self._pending: deque[_Pending] = deque()
        self._max_pending = max_pending
        self._interval_s = interval_s
        self._closed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # serialises close() callers only
        self.recorded = 0
        self.dropped = 0
        self.skipped = 0
        self.error: BaseException | None = None
        header = TraceHeader(
            workload=workload, device_size_bytes=device_size_bytes, start_time=now_iso()
        )
        stream.write(json_line(header.to_json()))
        self._thread = threading.Thread(
            target=self._run, name=f"trace-writer:{path.name}", daemon=True
        )
        self._thread.start()

    @classmethod
    def open(cls, path: Path, workload: str, device_size_bytes: int) -> TraceRecorder:
        """Create or truncate the operator's `path` (``--trace``, ``[record] path``).

        The operator chose this path, so an existing file is replaced as it
        always was; but a symlink there is refused rather than followed, so
        the daemon never writes through a link someone else planted.
        Raises OSError (TracePathError for a symlink) if it cannot.
        """
        path = Path(path)
        created = not os.path.lexists(path)
        try:
            fd = os.open(path, _WRITE_FLAGS | os.O_TRUNC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TracePathError(
                    f"cannot record trace to {str(path)!r}: it is a symlink; "
                    "portalbd does not follow one"
                ) from None
            raise
        if created:  # the mode the operator's umask gives, not the daemon's private one
            os.fchmod(fd, shared_mode(0o666))
        return cls._start(fd, path, workload, device_size_bytes)

    @classmethod
    def create_in(
        cls, trace_dir: Path, requested: str, workload: str, device_size_bytes: int
    ) -> TraceRecorder:
        """Start a trace a control-socket client asked for, confined to `trace_dir`.

        Whoever can reach the control socket is not the operator: the file is
        created only inside the instance's trace directory, never through a
        symlink, and never over an existing file (O_CREAT|O_EXCL|O_NOFOLLOW
        relative to the directory's descriptor). Raises TracePathError with
        the reason, or OSError.
        """
        name = confine_trace_name(trace_dir, requested)
        path = trace_dir / name
        dir_fd = _open_trace_dir(trace_dir)
        try:
            try:
                fd = os.open(name, _WRITE_FLAGS | os.O_EXCL, 0o640, dir_fd=dir_fd)
                os.fchmod(fd, shared_mode(0o640))
            except FileExistsError:
                raise TracePathError(
                    f"trace file {str(path)!r} already exists; "
                    "traces are never overwritten, choose another name"
                ) from None
        finally:
            os.close(dir_fd)
        return cls._start(fd, path, workload, device_size_bytes)

    @classmethod
    def _start(cls, fd: int, path: Path, workload: str, device_size_bytes: int) -> TraceRecorder:
        stream = _compressing(os.fdopen(fd, "wb"), path.name)
        try:
            return cls(stream, path, workload, device_size_bytes)
        except BaseException:
            stream.close()
            raise

    @property
    def active(self) -> bool:
        return not self._closed

    def request_done(
        self,
        conn_id: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        arrival_ns: int,
        duration_ns: int,
        error: int,
    ) -> None:
        """Queue one finished request.  Called on the event loop: must stay cheap."""
        if self._closed:
            return
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append(
            (conn_id, command, flags, offset, length, arrival_ns, duration_ns, error)
        )

    def close(self) -> None:
        """Write what is queued, the footer, and close the file.  Idempotent."""
        with self._lock:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
            self._stop.set()
            self._thread.join()
        if self.error is not None:
            log.error("trace %s is incomplete: %s", self.path, self.error)

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.wait(self._interval_s)
                self._drain()
                if stopping:
                    break
            footer = TraceFooter(
                duration_ns=time.monotonic_ns() - self._start_ns,
                ops=self.recorded,
                dropped=self.dropped,
            )
            self._stream.write(json_line(footer.to_json()))
        except BaseException as e:  # disk full, bad path...: stop recording, keep serving
            self.error = e
            self._closed = True
            self._pending.clear()
            log.error("trace recording to %s stopped: %s", self.path, e)
        finally:
            try:
                self._stream.close()
            except OSError as e:
                self.error = self.error or e

    def _drain(self) -> None:
        pending = self._pending
        names = OP_NAMES
        start = self._start_ns
        while pending:
            chunk: list[str] = []
            seq = self.recorded
            for _ in range(min(len(pending), 8192)):
                conn, cmd, flags, offset, length, arrival, duration, err = pending.popleft()
                name = names.get(cmd)
                if name is None:
                    self.skipped += 1
                    continue
                ts = arrival - start
                chunk.append(
                    _RECORD
                    % (seq, ts if ts > 0 else 0, conn, name, offset, length, flags, duration, err)
                )
                seq += 1
            self.recorded = seq
            if chunk:
                self._stream.write("".join(chunk).encode())
