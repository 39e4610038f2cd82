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

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from portalbd.trace.format import OP_NAMES, TraceFooter, TraceHeader, json_line, now_iso, open_write

log = logging.getLogger(__name__)

_RECORD = (
    '{"seq":%d,"ts_ns":%d,"conn":%d,"type":"%s","offset":%d,"length":%d,'
    '"flags":%d,"duration_ns":%d,"error":%d}\n'
)

_Pending = tuple[int, int, int, int, int, int, int, int]


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
        """Create (truncate) `path` and start recording; raises OSError if it cannot."""
        path = Path(path)
        stream = open_write(path)
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
