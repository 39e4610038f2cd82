"""Object-store request counts, as SlateDB itself records them.

SlateDB wraps its object store in an instrumented layer that counts every
request by API (``put``, ``get``, ``head``, ``list``, ``delete``, multipart
parts) and component (database, compactor, garbage collector), and counts
the bytes it uploads for WAL and SST files. We install one
``DefaultMetricsRecorder`` per open database and read those counters when
asked, so the figures are the requests really sent, at no cost per I/O.

What SlateDB does not record cannot be shown: bytes downloaded are not
counted, and the few requests made through ``Admin`` (checkpoints, clones)
have no recorder hook in the binding.
"""

from __future__ import annotations

from typing import Any

REQUESTS = "slatedb.object_store.request_count"
ERRORS = "slatedb.object_store.error_count"
# bytes SlateDB reports uploading: WAL objects, L0 SSTs, compaction output
WAL_BYTES = "slatedb.wal.wal_flush_bytes"
L0_BYTES = "slatedb.db.l0_flush_bytes"
COMPACTED_BYTES = "slatedb.compactor.bytes_compacted"

# SlateDB API label -> the request class a bill is made of
REQUEST_CLASS = {
    "put": "put",
    "multipart_init": "put",
    "multipart_part": "put",
    "multipart_complete": "put",
    "get": "get",
    "get_range": "get",
    "get_ranges": "get",
    "head": "head",
    "list": "list",
    "list_with_offset": "list",
    "list_with_delimiter": "list",
    "delete": "delete",
}

FIELDS = (
    "put",
    "get",
    "head",
    "list",
    "delete",
    "errors",
    "wal_bytes_put",
    "sst_bytes_put",
    "compacted_bytes_put",
)


def empty() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)


def _counter_value(metric: Any) -> int:
    value = metric.value
    if value.is_counter() or value.is_gauge() or value.is_up_down_counter():
        return int(value[0])
    return 0


def read(recorder: Any) -> dict[str, int]:
    """Current totals of one recorder (one database)."""
    out = empty()
    for name, target in ((REQUESTS, None), (ERRORS, "errors")):
        for metric in recorder.metrics_by_name(name):
            labels = {label.key: label.value for label in metric.labels}
            key = target or REQUEST_CLASS.get(labels.get("api", ""))
            if key is not None:
                out[key] += _counter_value(metric)
    for name, key in (
        (WAL_BYTES, "wal_bytes_put"),
        (L0_BYTES, "sst_bytes_put"),
        (COMPACTED_BYTES, "compacted_bytes_put"),
    ):
        for metric in recorder.metrics_by_name(name):
            out[key] += _counter_value(metric)
    return out


class ObjectStoreCounters:
    """Totals across every database an instance has opened, closed ones included."""

    def __init__(self) -> None:
        self._live: list[Any] = []
        self._retired = empty()

    def new_recorder(self) -> Any:
        from portalbd.store.binding import sdb

        recorder = sdb.DefaultMetricsRecorder()
        self._live.append(recorder)
        return recorder

    def retire(self, recorder: Any) -> None:
        """A database closed: keep its totals, drop the recorder."""
        if recorder in self._live:
            self._live.remove(recorder)
            for key, value in read(recorder).items():
                self._retired[key] += value

    def as_dict(self) -> dict[str, int]:
        out = dict(self._retired)
        for recorder in self._live:
            for key, value in read(recorder).items():
                out[key] += value
        out["requests"] = sum(out[k] for k in ("put", "get", "head", "list", "delete"))
        return out
