"""Reads nbdkit's log filter output as a trace.

`gen --server nbdkit` records a workload with `nbdkit --filter=log memory`
instead of portalbd: a recorder that does not depend on the daemon under
test, useful to cross-check portalbd's own recording and to produce traces
where portalbd is not installed.  nbdkit logs wall-clock microseconds, so
these traces have microsecond resolution.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

from portalbd.trace import format
from portalbd.trace.format import FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, FLAG_REQ_ONE, OpType

_LINE = re.compile(
    r"^(?P<date>\S+ \S+) connection=(?P<conn>\d+) (?P<done>\.\.\.)?(?P<cmd>\w+) id=(?P<id>\d+)"
    r"(?P<rest>.*)$"
)
_KV = re.compile(r"(\w+)=(\S+)")
_COMMANDS = {
    "Read": OpType.Read,
    "Write": OpType.Write,
    "Flush": OpType.Flush,
    "Trim": OpType.Trim,
    "Zero": OpType.WriteZeroes,
    "Cache": OpType.Cache,
    "Extents": OpType.BlockStatus,
}
_ERRNO = {"EPERM": 1, "EIO": 5, "ENOMEM": 12, "EINVAL": 22, "ENOSPC": 28, "EOVERFLOW": 75,
          "ENOTSUP": 95, "ESHUTDOWN": 108}  # fmt: skip


def _ns(stamp: str) -> int:
    t = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def parse(path: Path) -> Iterator[tuple[int, int, OpType, int, int, int, int, int]]:
    """(arrival_ns, conn, type, offset, length, flags, duration_ns, error), completion order."""
    started: dict[tuple[int, int], tuple[int, OpType, int, int, int]] = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if m is None or m["cmd"] not in _COMMANDS:
                continue
            key = (int(m["conn"]), int(m["id"]))
            kv = dict(_KV.findall(m["rest"]))
            when = _ns(m["date"])
            if m["done"] is None:
                kind = _COMMANDS[m["cmd"]]
                flags = 0
                if kv.get("fua") == "1":
                    flags |= FLAG_FUA
                if kind == OpType.WriteZeroes and kv.get("trim") == "0":
                    flags |= FLAG_NO_HOLE
                if kv.get("fast") == "1":
                    flags |= FLAG_FAST_ZERO
                if kv.get("req_one") == "1":
                    flags |= FLAG_REQ_ONE
                started[key] = (
                    when,
                    kind,
                    int(kv.get("offset", "0"), 0),
                    int(kv.get("count", "0"), 0),
                    flags,
                )
            else:
                begin = started.pop(key, None)
                if begin is None:
                    continue
                t0, kind, offset, length, flags = begin
                ret = kv.get("return", "0")
                err = 0
                if ret != "0":
                    name = m["rest"].rsplit("(", 1)[-1].rstrip(")") if "(" in m["rest"] else ""
                    err = _ERRNO.get(name, 5)
                yield t0, key[0], kind, offset, length, flags, when - t0, err


def to_trace(log: Path, out: Path, workload: str, device_size_bytes: int) -> int:
    """Convert a log file to a trace file; returns the number of requests."""
    rows = list(parse(log))
    start = min((r[0] for r in rows), default=0)
    ops = sorted(
        (
            format.TraceOp(i, r[0] - start, r[1], r[2], r[3], r[4], r[5], r[6], r[7])
            for i, r in enumerate(rows)
        ),
        key=lambda op: (op.ts_ns, op.seq),
    )
    header = format.TraceHeader(
        workload=workload, device_size_bytes=device_size_bytes, start_time=format.now_iso()
    )
    return format.write(out, header, ops)
