"""Replays a trace against any NBD server with libnbd's asynchronous API.

Concurrency is kept as recorded, not invented: request *i* may start once
every request that had *completed* before *i* arrived (in the recording) has
completed in the replay.  Requests that overlapped in the recording overlap
again; a request the client issued only after seeing an earlier reply waits
for that reply again.  With `speed` set, a request also waits until its
recorded arrival time divided by `speed` (timing-faithful, scaled); without
it requests go as fast as the server answers.

One libnbd handle per recorded connection (optionally folded onto fewer),
all driven from one poll loop in this thread: no threads, no asyncio.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as errno_mod
import functools
import select
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nbd
import numpy as np
import numpy.typing as npt

from portalbd.trace.format import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    OpType,
    TraceOp,
)
from portalbd.trace.pattern import pattern

ProgressFn = Callable[[int, int], None]


class ReplayError(RuntimeError):
    """The replay could not run (connection refused, device too small...)."""


@dataclass(slots=True, kw_only=True)
class ReplayOptions:
    speed: float | None = None
    connections: int | None = None  # fold recorded connections onto at most this many
    max_inflight: int = 512
    stop_on_error: bool = False


@dataclass(slots=True)
class ReplayResult:
    """Per-request outcomes, in compact arrays (indices follow the trace)."""

    elapsed_ns: int = 0
    issued: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    types: array[int] = field(default_factory=lambda: array("b"))
    lengths: array[int] = field(default_factory=lambda: array("q"))
    start_ns: array[int] = field(default_factory=lambda: array("q"))  # since replay start
    latency_ns: array[int] = field(default_factory=lambda: array("q"))
    errors: array[int] = field(default_factory=lambda: array("i"))
    connections: int = 0
    max_inflight_seen: int = 0

    @property
    def error_count(self) -> int:
        return sum(1 for e in self.errors if e > 0)


class _Conn:
    __slots__ = (
        "can_cache",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_meta",
        "can_trim",
        "can_zero",
        "fd",
        "handle",
        "mask",
    )

    def __init__(self, uri: str) -> None:
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_uri(uri)
        except nbd.Error as e:
            raise ReplayError(f"cannot connect to {uri}: {e}") from None
        self.handle = h
        self.fd: int = h.aio_get_fd()
        self.mask = 0
        self.can_fua = bool(h.can_fua())
        self.can_trim = bool(h.can_trim())
        self.can_zero = bool(h.can_zero())
        self.can_fast_zero = bool(h.can_fast_zero())
        self.can_cache = bool(h.can_cache())
        self.can_flush = bool(h.can_flush())
        self.can_meta = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))

    def close(self) -> None:
        try:
            if self.handle.aio_is_ready():
                self.handle.shutdown()
        except nbd.Error:
            pass
        del self.handle


def _dependencies(ops: Sequence[TraceOp]) -> tuple[array[int], array[int]]:
    """(need, by_end): op i waits until the first need[i] ops of by_end are done."""
    n = len(ops)
    ends = [op.ts_ns + op.duration_ns for op in ops]
    by_end = array("q", sorted(range(n), key=ends.__getitem__))
    sorted_ends = [ends[j] for j in by_end]
    need = array("q", (bisect.bisect_left(sorted_ends, op.ts_ns) for op in ops))
    return need, by_end


def _noop_extent(*_args: Any) -> int:
    return 0


class _BufferPool:
    """libnbd buffers reused once their request has completed.

    Debian 12's libnbd Python binding (1.14) keeps a reference to every
    ``nbd.Buffer`` handed to ``aio_pread``/``aio_pwrite`` and never drops
    it, so a buffer per request is never freed: a replay leaked every byte
    it read or wrote (660 MiB a pass of the pgbench trace; ``bench --all``
    went past 18 GiB and the OOM killer ended it). A buffer is a view of a
    numpy array here, refilled for its next request, so memory stays what
    is in flight at once, for each request size. One pool serves every
    replay in the process (:data:`_BUFFERS`): a pool per replay would leave
    its buffers behind, held by the binding, at the end of each pass.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[tuple[npt.NDArray[np.uint8], Any]]] = {}

    def take(self, length: int) -> tuple[npt.NDArray[np.uint8], Any]:
        with contextlib.suppress(KeyError, IndexError):  # none free of that size
            return self._free[length].pop()
        data = np.empty(length, dtype=np.uint8)
        return data, nbd.Buffer.from_buffer(data)

    def give(self, entry: tuple[npt.NDArray[np.uint8], Any]) -> None:
        self._free.setdefault(len(entry[0]), []).append(entry)


_BUFFERS = _BufferPool()


class Replayer:
    """One replay of `ops` (in arrival order) against `uri`."""

    def __init__(
        self,
        uri: str,
        ops: Sequence[TraceOp],
        options: ReplayOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.uri = uri
        self.ops = ops
        self.opt = options or ReplayOptions()
        self.progress = progress
        conn_ids = sorted({op.conn for op in ops}) or [0]
        limit = self.opt.connections or len(conn_ids)
        self._conn_slot = {cid: i % limit for i, cid in enumerate(conn_ids)}
        self._nconns = min(limit, len(conn_ids))
        # More connections asked for than were recorded (an original trace
        # has one): requests are dealt round-robin over them, as the
        # original's replayer did for nbd-client -C N.
        self._spread = limit if limit > len(conn_ids) else 0
        if self._spread:
            self._nconns = limit

    def run(self) -> ReplayResult:
        ops = self.ops
        n = len(ops)
        res = ReplayResult()
        res.types = array("b", (op.type for op in ops))
        res.lengths = array("q", (op.length for op in ops))
        res.start_ns = array("q", bytes(8 * n))
        res.latency_ns = array("q", bytes(8 * n))
        res.errors = array("i", bytes(4 * n))
        need, by_end = _dependencies(ops)
        done = bytearray(n)
        conns = [_Conn(self.uri) for _ in range(self._nconns)]
        res.connections = len(conns)
        size = conns[0].handle.get_size()
        poller = select.poll()
        by_fd = {c.fd: c for c in conns}
        state = {"prefix": 0, "inflight": 0, "completed": 0}
        pool = _BUFFERS
        keep: dict[int, tuple[npt.NDArray[np.uint8], Any]] = {}  # outlive their requests

        def release(i: int) -> None:
            entry = keep.pop(i, None)
            if entry is not None:
                pool.give(entry)

        speed = self.opt.speed
        max_inflight = self.opt.max_inflight
        t0 = time.monotonic_ns()

        def finish(i: int, err: int) -> None:
            now = time.monotonic_ns()
            res.latency_ns[i] = now - t0 - res.start_ns[i]
            res.errors[i] = err
            done[i] = 1
            release(i)
            state["inflight"] -= 1
            state["completed"] += 1
            p = state["prefix"]
            while p < n and done[by_end[p]]:
                p += 1
            state["prefix"] = p

        def skip(i: int, why: str | None) -> None:
            if why is not None:
                res.skipped[why] = res.skipped.get(why, 0) + 1
            res.errors[i] = -1
            state["inflight"] += 1
            finish(i, -1)
            res.latency_ns[i] = 0

        def completion(i: int, err: Any) -> int:
            finish(i, int(err.value))
            return 1

        def issue(i: int) -> None:
            op = ops[i]
            c = conns[i % self._spread if self._spread else self._conn_slot[op.conn]]
            h = c.handle
            kind = op.type
            cb = functools.partial(completion, i)
            if (
                kind != OpType.Flush
                and kind != OpType.Disconnect
                and (op.offset + op.length > size or op.length <= 0)
            ):
                skip(i, "beyond device end" if op.length > 0 else "zero length")
                return
            flags = 0
            res.start_ns[i] = time.monotonic_ns() - t0
            state["inflight"] += 1
            try:
                if kind == OpType.Read:
                    entry = keep[i] = pool.take(op.length)
                    h.aio_pread(entry[1], op.offset, completion=cb)
                elif kind == OpType.Write:
                    if op.flags & FLAG_FUA and c.can_fua:
                        flags |= nbd.CMD_FLAG_FUA
                    entry = keep[i] = pool.take(op.length)
                    np.copyto(entry[0], pattern(op.offset, op.length))
                    h.aio_pwrite(entry[1], op.offset, completion=cb, flags=flags)
                elif kind == OpType.Flush:
                    if not c.can_flush:
                        state["inflight"] -= 1
                        skip(i, "server cannot flush")
                        return
                    h.aio_flush(completion=cb)
                elif kind == OpType.Trim:
                    if not c.can_trim:
                        state["inflight"] -= 1
                        skip(i, "server cannot trim")
                        return
                    if op.flags & FLAG_FUA and c.can_fua:
                        flags |= nbd.CMD_FLAG_FUA
                    h.aio_trim(op.length, op.offset, completion=cb, flags=flags)
                elif kind == OpType.WriteZeroes:
                    if not c.can_zero:
                        state["inflight"] -= 1
                        skip(i, "server cannot write zeroes")
                        return
                    if op.flags & FLAG_FUA and c.can_fua:
                        flags |= nbd.CMD_FLAG_FUA
                    if op.flags & FLAG_NO_HOLE:
                        flags |= nbd.CMD_FLAG_NO_HOLE
                    if op.flags & FLAG_FAST_ZERO and c.can_fast_zero:
                        flags |= nbd.CMD_FLAG_FAST_ZERO
                    h.aio_zero(op.length, op.offset, completion=cb, flags=flags)
                elif kind == OpType.Cache:
                    if not c.can_cache:
                        state["inflight"] -= 1
                        skip(i, "server cannot cache")
                        return
                    h.aio_cache(op.length, op.offset, completion=cb)
                elif kind == OpType.BlockStatus:
                    if not c.can_meta:
                        state["inflight"] -= 1
                        skip(i, "server has no base:allocation")
                        return
                    if op.flags & FLAG_REQ_ONE:
                        flags |= nbd.CMD_FLAG_REQ_ONE
                    h.aio_block_status(
                        op.length, op.offset, _noop_extent, completion=cb, flags=flags
                    )
                else:  # Disconnect: connections close at the end of the replay
                    state["inflight"] -= 1
                    skip(i, None)
                    return
            except nbd.Error as e:
                # Refused locally (libnbd strict checks): count as a failed request.
                release(i)
                finish(i, e.errno or errno_mod.EINVAL)
            res.issued += 1
            if state["inflight"] > res.max_inflight_seen:
                res.max_inflight_seen = state["inflight"]

        nxt = 0
        last_progress = 0
        try:
            while state["completed"] < n:
                # Issue everything that is allowed now.
                wait_ms = -1
                while nxt < n and state["inflight"] < max_inflight:
                    if need[nxt] > state["prefix"]:
                        break
                    if speed is not None:
                        due = t0 + int(ops[nxt].ts_ns / speed)
                        now = time.monotonic_ns()
                        if now < due:
                            wait_ms = max(1, (due - now) // 1_000_000)
                            break
                    issue(nxt)
                    nxt += 1
                if self.opt.stop_on_error and res.error_count:
                    raise ReplayError("a request failed (stop_on_error)")
                if state["completed"] >= n:
                    break
                if state["inflight"] == 0:
                    if wait_ms < 0:
                        raise ReplayError("replay stalled: nothing in flight, nothing ready")
                    time.sleep(wait_ms / 1000)
                    continue
                for c in conns:
                    d = c.handle.aio_get_direction()
                    mask = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (
                        select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0
                    )
                    if mask != c.mask:
                        if c.mask:
                            poller.modify(c.fd, mask) if mask else poller.unregister(c.fd)
                        else:
                            poller.register(c.fd, mask)
                        c.mask = mask
                for fd, ev in poller.poll(wait_ms if wait_ms >= 0 else 1000):
                    c = by_fd[fd]
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        c.handle.aio_notify_read()
                    elif ev & select.POLLOUT:
                        c.handle.aio_notify_write()
                if self.progress is not None and state["completed"] - last_progress >= 256:
                    last_progress = state["completed"]
                    self.progress(last_progress, n)
        except nbd.Error as e:
            raise ReplayError(f"connection to {self.uri} failed during replay: {e}") from None
        finally:
            res.elapsed_ns = time.monotonic_ns() - t0
            for c in conns:
                c.close()
        if self.progress is not None:
            self.progress(n, n)
        return res


def replay(
    uri: str,
    ops: Sequence[TraceOp],
    options: ReplayOptions | None = None,
    progress: ProgressFn | None = None,
) -> ReplayResult:
    return Replayer(uri, ops, options, progress).run()
