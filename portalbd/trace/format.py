"""The trace file format: JSON lines, optionally zstd- or gzip-compressed.

A trace is streamed, never held whole: line 1 is a header object, then one
object per NBD request, then (when the recorder closed cleanly) a footer::

    {"format": "portalbd-trace", "version": 1, "workload": "mkfs",
     "device_size_bytes": 1073741824, "start_time": "2026-11-25T15:00:00+00:00"}
    {"seq": 0, "ts_ns": 1200, "conn": 1, "type": "Write", "offset": 0,
     "length": 4096, "flags": 1, "duration_ns": 83000, "error": 0}
    ...
    {"end": true, "duration_ns": 5000000000, "ops": 1234, "dropped": 0}

`ts_ns` is the request's arrival time (header parsed) in nanoseconds since the
recording started; `seq` numbers requests in the order they completed, so
readers put them back in arrival order (`iter_ops` does).  Compression is
chosen from the file name on write (`.zst`, `.gz`) and from the magic bytes on
read, so a renamed file still opens.

The original Rust portalbd wrote one pretty-printed JSON document
(`{workload, device_size_bytes, start_time, duration_ns, ops: [...]}`);
`load_original` / `export_original` convert to and from it.
"""

from __future__ import annotations

import datetime as dt
import gzip
import heapq
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import zstandard

FORMAT_NAME = "portalbd-trace"
FORMAT_VERSION = 1

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"

# NBD command flags as recorded (NBD_CMD_FLAG_*).
FLAG_FUA = 1
FLAG_NO_HOLE = 2
FLAG_DF = 4
FLAG_REQ_ONE = 8
FLAG_FAST_ZERO = 16


class OpType(IntEnum):
    """NBD command numbers, named as the original trace format names them."""

    Read = 0
    Write = 1
    Disconnect = 2
    Flush = 3
    Trim = 4
    Cache = 5
    WriteZeroes = 6
    BlockStatus = 7


OP_NAMES: dict[int, str] = {t.value: t.name for t in OpType}
OP_BY_NAME: dict[str, OpType] = {t.name: t for t in OpType}
# Types the original format can express (its enum had no Cache/BlockStatus).
ORIGINAL_TYPES = frozenset(
    {OpType.Read, OpType.Write, OpType.Trim, OpType.WriteZeroes, OpType.Flush}
)


class TraceFormatError(ValueError):
    """The file is not a trace this module can read; the message says where."""


class TraceOp(NamedTuple):
    """One recorded request.  A tuple, not a dataclass: traces hold millions."""

    seq: int
    ts_ns: int
    conn: int
    type: OpType
    offset: int
    length: int
    flags: int
    duration_ns: int
    error: int

    @property
    def success(self) -> bool:
        return self.error == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts_ns": self.ts_ns,
            "conn": self.conn,
            "type": self.type.name,
            "offset": self.offset,
            "length": self.length,
            "flags": self.flags,
            "duration_ns": self.duration_ns,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceHeader:
    workload: str
    device_size_bytes: int
    start_time: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "workload": self.workload,
            "device_size_bytes": self.device_size_bytes,
            "start_time": self.start_time,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceFooter:
    duration_ns: int
    ops: int
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "end": True,
            "duration_ns": self.duration_ns,
            "ops": self.ops,
            "dropped": self.dropped,
        }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- raw streams


def open_write(path: Path) -> IO[bytes]:
    """A binary stream that compresses according to the file name."""
    raw = open(path, "wb")  # noqa: SIM115 - returned to the caller, who closes it
    name = path.name
    if name.endswith(".zst") or name.endswith(".zstd"):
        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
    if name.endswith(".gz"):
        gz = gzip.GzipFile(fileobj=_ClosingGzipTarget(raw), mode="wb", compresslevel=6)
        return cast(IO[bytes], gz)
    return raw


class _ClosingGzipTarget(io.RawIOBase):
    """GzipFile leaves a passed fileobj open; this closes the file with it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._raw.write(b)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_read(path: Path) -> IO[bytes]:
    """A binary stream of the decompressed content, whatever the name says."""
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(ZSTD_MAGIC):
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    if magic.startswith(GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw


# ---------------------------------------------------------------- JSON lines


def op_from_json(obj: dict[str, Any], where: str) -> TraceOp:
    try:
        kind = OP_BY_NAME[obj["type"]]
        return TraceOp(
            seq=int(obj["seq"]),
            ts_ns=int(obj["ts_ns"]),
            conn=int(obj.get("conn", 0)),
            type=kind,
            offset=int(obj.get("offset", 0)),
            length=int(obj.get("length", 0)),
            flags=int(obj.get("flags", 0)),
            duration_ns=int(obj.get("duration_ns", 0)),
            error=int(obj.get("error", 0)),
        )
    except KeyError as e:
        raise TraceFormatError(f"{where}: missing or unknown field {e}") from None
    except (TypeError, ValueError) as e:
        raise TraceFormatError(f"{where}: bad value: {e}") from None


class TraceReader:
    """Streams a trace (JSON lines or original JSON), header first.

    Use as a context manager; `ops()` yields records in file order,
    `iter_ops()` puts them in arrival order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream = open_read(path)
        self.footer: TraceFooter | None = None
        self._original: dict[str, Any] | None = None
        self._text = io.TextIOWrapper(self._stream, encoding="utf-8")
        self._line_no = 0
        first = self._next_line()
        if first is None:
            raise TraceFormatError(f"{path}: empty file")
        header_obj = self._parse_first(first)
        self.header = TraceHeader(
            workload=str(header_obj.get("workload", "unnamed")),
            device_size_bytes=int(header_obj.get("device_size_bytes", 0)),
            start_time=str(header_obj.get("start_time", "")),
        )

    def _next_line(self) -> str | None:
        while True:
            line = self._text.readline()
            if not line:
                return None
            self._line_no += 1
            if line.strip():
                return line

    def _parse_first(self, first: str) -> dict[str, Any]:
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
            version = obj.get("version")
            if version != FORMAT_VERSION:
                raise TraceFormatError(
                    f"{self.path}: trace format version {version} is not supported "
                    f"(this portalbd reads version {FORMAT_VERSION})"
                )
            return obj
        # Not our header line: it must be the original single JSON document.
        rest = first + self._text.read()
        try:
            doc = json.loads(rest)
        except json.JSONDecodeError as e:
            raise TraceFormatError(
                f"{self.path}: neither a portalbd trace (JSON lines) nor an original "
                f"portalbd trace (JSON): {e}"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
            raise TraceFormatError(f"{self.path}: JSON document has no 'ops' list")
        self._original = doc
        return doc

    @property
    def is_original(self) -> bool:
        return self._original is not None

    def ops(self) -> Iterator[TraceOp]:
        if self._original is not None:
            yield from _original_ops(self._original, str(self.path))
            self.footer = TraceFooter(
                duration_ns=int(self._original.get("duration_ns", 0)),
                ops=len(self._original["ops"]),
            )
            return
        while True:
            line = self._next_line()
            if line is None:
                return
            where = f"{self.path}:{self._line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # A recorder killed mid-write leaves a torn last line: stop there.
                if self._next_line() is None:
                    return
                raise TraceFormatError(f"{where}: not JSON: {e}") from None
            if obj.get("end") is True:
                self.footer = TraceFooter(
                    duration_ns=int(obj.get("duration_ns", 0)),
                    ops=int(obj.get("ops", 0)),
                    dropped=int(obj.get("dropped", 0)),
                )
                continue
            yield op_from_json(obj, where)

    def iter_ops(self, window: int = 65536) -> Iterator[TraceOp]:
        """Records in arrival order (by `ts_ns`, then `seq`).

        The recorder writes in completion order, which differs from arrival
        order by at most the number of requests in flight; a heap of `window`
        records restores the order without reading the whole file.
        """
        heap: list[tuple[int, int, TraceOp]] = []
        for op in self.ops():
            heapq.heappush(heap, (op.ts_ns, op.seq, op))
            if len(heap) > window:
                yield heapq.heappop(heap)[2]
        while heap:
            yield heapq.heappop(heap)[2]

    def close(self) -> None:
        self._text.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: Path) -> tuple[TraceHeader, list[TraceOp]]:
    """Whole trace in arrival order (for replay, which needs it all anyway)."""
    with TraceReader(path) as reader:
        ops = list(reader.iter_ops())
        return reader.header, ops


def write(
    path: Path,
    header: TraceHeader,
    ops: Iterable[TraceOp],
    duration_ns: int | None = None,
) -> int:
    """Write a whole trace; returns the number of records written."""
    count = 0
    last_end = 0
    with open_write(path) as out:
        out.write(json_line(header.to_json()))
        for op in ops:
            out.write(json_line(op.to_json()))
            count += 1
            last_end = max(last_end, op.ts_ns + op.duration_ns)
        footer = TraceFooter(duration_ns=duration_ns or last_end, ops=count)
        out.write(json_line(footer.to_json()))
    return count


def json_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


# ---------------------------------------------------------------- original format


def _original_ops(doc: dict[str, Any], where: str) -> Iterator[TraceOp]:
    for i, item in enumerate(doc["ops"]):
        try:
            op = item["op"]
            kind = OP_BY_NAME[op["type"]]
            if kind not in ORIGINAL_TYPES:
                raise KeyError(op["type"])
            yield TraceOp(
                seq=int(item.get("seq", i)),
                ts_ns=int(item["timestamp_ns"]),
                conn=0,
                type=kind,
                offset=int(op.get("offset", 0)),
                length=int(op.get("length", 0)),
                flags=0,
                duration_ns=int(item.get("duration_ns", 0)),
                error=0 if item.get("success", True) else 5,  # EIO: the cause is unknown
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TraceFormatError(f"{where}: ops[{i}]: bad operation ({e!r})") from None


def load_original(path: Path) -> tuple[TraceHeader, list[TraceOp]]:
    """Read an original portalbd trace (JSON, possibly compressed)."""
    reader = TraceReader(path)
    with reader:
        if not reader.is_original:
            raise TraceFormatError(f"{path}: this is a JSON-lines trace, not an original one")
        return reader.header, list(reader.iter_ops())


def import_original(src: Path, dest: Path) -> int:
    """Convert an original trace to JSON lines; returns the operations written.

    Every operation keeps its ``duration_ns``, and the trace its recorded
    total duration (not one recomputed from the operations).
    """
    with TraceReader(src) as reader:
        if not reader.is_original:
            raise TraceFormatError(f"{src}: this is a JSON-lines trace, not an original one")
        ops = list(reader.iter_ops())
        total = reader.footer.duration_ns if reader.footer is not None else None
        header = reader.header
    return write(dest, header, ops, duration_ns=total or None)


def export_original(src: Path, dest: Path) -> tuple[int, int]:
    """Convert a trace to the original format; returns (written, skipped).

    The original format has no connection ids, flags, errno or Cache /
    BlockStatus requests: those requests are skipped, the rest lose the
    fields the format cannot carry.  Written streamingly, op by op.
    """
    written = skipped = 0
    with TraceReader(src) as reader, open_write(dest) as raw:
        out = io.TextIOWrapper(raw, encoding="utf-8")
        h = reader.header
        out.write("{\n")
        out.write(f'  "workload": {json.dumps(h.workload)},\n')
        out.write(f'  "device_size_bytes": {h.device_size_bytes},\n')
        out.write(f'  "start_time": {json.dumps(h.start_time)},\n')
        out.write('  "ops": [')
        last_end = 0
        for op in reader.iter_ops():
            if op.type not in ORIGINAL_TYPES:
                skipped += 1
                continue
            inner: dict[str, Any] = {"type": op.type.name}
            if op.type != OpType.Flush:
                inner["offset"] = op.offset
                inner["length"] = op.length
            item = {
                "seq": written,
                "timestamp_ns": max(op.ts_ns, 0),
                "op": inner,
                "duration_ns": op.duration_ns,
                "success": op.success,
            }
            out.write(("\n    " if written == 0 else ",\n    ") + json.dumps(item))
            written += 1
            last_end = max(last_end, op.ts_ns + op.duration_ns)
        footer = reader.footer
        duration = footer.duration_ns if footer and footer.duration_ns else last_end
        out.write(("\n  ]" if written else "]") + f',\n  "duration_ns": {duration}\n}}\n')
        out.flush()
        out.detach()
    return written, skipped


def describe(path: Path) -> dict[str, Any]:
    """Summary counts of a trace (for `portalbd-trace info`)."""
    counts: dict[str, int] = {}
    bytes_by: dict[str, int] = {}
    conns: set[int] = set()
    n = errors = 0
    last = 0
    with TraceReader(path) as reader:
        for op in reader.ops():
            name = op.type.name
            counts[name] = counts.get(name, 0) + 1
            if op.type in (OpType.Read, OpType.Write, OpType.Trim, OpType.WriteZeroes):
                bytes_by[name] = bytes_by.get(name, 0) + op.length
            conns.add(op.conn)
            errors += op.error != 0
            n += 1
            last = max(last, op.ts_ns + op.duration_ns)
        footer = reader.footer
        return {
            "path": os.fspath(path),
            "format": "original" if reader.is_original else "jsonl",
            "workload": reader.header.workload,
            "device_size_bytes": reader.header.device_size_bytes,
            "start_time": reader.header.start_time,
            "ops": n,
            "connections": len(conns),
            "errors": errors,
            "duration_ns": footer.duration_ns if footer else last,
            "dropped": footer.dropped if footer else 0,
            "complete": footer is not None,
            "counts": counts,
            "bytes": bytes_by,
        }
