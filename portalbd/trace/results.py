"""Turning replay outcomes into the figures `bench` prints and stores.

The JSON written by `bench --json` is the contract between runs (for
`--compare`) and for CI; `BENCH_SCHEMA` describes it and `validate` checks a
document against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from portalbd.trace.format import OpType
from portalbd.trace.replay import ReplayResult

SCHEMA_ID = "portalbd-trace-bench/1"
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
# Bytes moved over the wire (the total MiB/s); Trim, WriteZeroes and Cache get a
# per-type MiB/s of the range they cover, which is not data transferred.
TRANSFER_TYPES = (OpType.Read, OpType.Write)
DATA_TYPES = (OpType.Read, OpType.Write, OpType.Trim, OpType.WriteZeroes, OpType.Cache)
MIB = 1024 * 1024

_LATENCY = {
    "type": "object",
    "required": ["p50", "p90", "p99", "p99.9", "max"],
    "properties": {
        k: {"type": "number", "minimum": 0} for k in ("p50", "p90", "p99", "p99.9", "max")
    },
}
_FIGURES = {
    "type": "object",
    "required": ["ops", "ops_per_s", "mib_per_s", "errors", "latency_us"],
    "properties": {
        "ops": {"type": "integer", "minimum": 0},
        "ops_per_s": {"type": "number", "minimum": 0},
        "mib_per_s": {"type": "number", "minimum": 0},
        "errors": {"type": "integer", "minimum": 0},
        "latency_us": _LATENCY,
    },
}
BENCH_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "created", "runs"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "trace",
                    "workload",
                    "label",
                    "config",
                    "iterations",
                    "warmup",
                    "elapsed_s",
                    "total",
                    "by_type",
                    "store",
                    "skipped",
                ],
                "properties": {
                    "trace": {"type": "string"},
                    "workload": {"type": "string"},
                    "label": {"type": "string"},
                    "config": {"type": "object"},
                    "iterations": {"type": "integer", "minimum": 1},
                    "warmup": {"type": "integer", "minimum": 0},
                    "elapsed_s": {"type": "number", "minimum": 0},
                    "total": _FIGURES,
                    "by_type": {"type": "object", "additionalProperties": _FIGURES},
                    "store": {"type": ["object", "null"]},
                    "skipped": {"type": "object"},
                    "timeline": {"type": "object"},
                    "cdf": {"type": "object"},
                    "iteration_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
                    "rounds": {"type": "integer", "minimum": 1},
                    # the daemon measured: which checkout, its version, its --print-config
                    "daemon": {
                        "type": "object",
                        "required": ["side", "version", "settings"],
                        "properties": {
                            "side": {"enum": ["current", "baseline"]},
                            "tree": {"type": "string"},
                            "version": {"type": ["string", "null"]},
                            "commit": {"type": ["string", "null"]},
                            "settings": {"type": ["object", "null"]},
                        },
                    },
                },
            },
        },
        # the portalbd that ran the bench, and --baseline's checkout
        "portalbd": {"type": "object"},
        "baseline": {"type": "object"},
    },
}


def validate(doc: Any) -> None:
    """Raise jsonschema.ValidationError if `doc` is not a bench result."""
    import jsonschema

    jsonschema.validate(doc, BENCH_SCHEMA)


def _latency(lat_ns: npt.NDArray[np.int64]) -> dict[str, float]:
    if lat_ns.size == 0:
        return {name: 0.0 for name, _ in PERCENTILES} | {"max": 0.0}
    us = lat_ns / 1000.0
    out = {name: round(float(np.percentile(us, q)), 1) for name, q in PERCENTILES}
    out["max"] = round(float(us.max()), 1)
    return out


def _figures(
    lat: npt.NDArray[np.int64], nbytes: int, errors: int, elapsed_s: float, count: int
) -> dict[str, Any]:
    return {
        "ops": count,
        "ops_per_s": round(count / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "mib_per_s": round(nbytes / MIB / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "errors": errors,
        "latency_us": _latency(lat),
    }


def summarize(results: Sequence[ReplayResult]) -> dict[str, Any]:
    """Figures over several measured iterations, per op type and in total."""
    elapsed_s = sum(r.elapsed_ns for r in results) / 1e9
    types = np.concatenate([np.frombuffer(r.types, dtype=np.int8) for r in results])
    lengths = np.concatenate([np.frombuffer(r.lengths, dtype=np.int64) for r in results])
    lat = np.concatenate([np.frombuffer(r.latency_ns, dtype=np.int64) for r in results])
    errs = np.concatenate([np.frombuffer(r.errors, dtype=np.int32) for r in results])
    ran = errs >= 0  # -1 marks requests skipped (unsupported, beyond the end)
    data_mask = np.isin(types, [int(t) for t in TRANSFER_TYPES])
    by_type: dict[str, Any] = {}
    for t in OpType:
        m = (types == int(t)) & ran
        count = int(m.sum())
        if count == 0:
            continue
        nbytes = int(lengths[m].sum()) if t in DATA_TYPES else 0
        by_type[t.name] = _figures(lat[m], nbytes, int((errs[m] > 0).sum()), elapsed_s, count)
    total = _figures(
        lat[ran],
        int(lengths[ran & data_mask].sum()),
        int((errs > 0).sum()),
        elapsed_s,
        int(ran.sum()),
    )
    skipped: dict[str, int] = {}
    for r in results:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return {
        "elapsed_s": round(elapsed_s, 4),
        "total": total,
        "by_type": by_type,
        "skipped": skipped,
        "timeline": timeline(results[-1]),
        "cdf": cdf(results),
    }


def timeline(r: ReplayResult, buckets: int = 100) -> dict[str, Any]:
    """MiB/s and ops/s per op type over the replay, in about `buckets` steps."""
    elapsed_s = max(r.elapsed_ns / 1e9, 1e-6)
    step = max(elapsed_s / buckets, 0.01)
    nb = int(elapsed_s / step) + 1
    types = np.frombuffer(r.types, dtype=np.int8)
    lengths = np.frombuffer(r.lengths, dtype=np.int64)
    done_s = (
        np.frombuffer(r.start_ns, dtype=np.int64) + np.frombuffer(r.latency_ns, dtype=np.int64)
    ) / 1e9
    idx = np.minimum((done_s / step).astype(np.int64), nb - 1)
    out: dict[str, Any] = {"bucket_s": step, "ops_per_s": {}, "mib_per_s": {}}
    for t in OpType:
        m = types == int(t)
        if not m.any():
            continue
        ops = np.bincount(idx[m], minlength=nb) / step
        out["ops_per_s"][t.name] = [round(float(x), 1) for x in ops]
        if t in DATA_TYPES:
            mib = np.bincount(idx[m], weights=lengths[m], minlength=nb) / MIB / step
            out["mib_per_s"][t.name] = [round(float(x), 3) for x in mib]
    return out


def cdf(results: Sequence[ReplayResult], points: int = 200) -> dict[str, list[list[float]]]:
    """Latency CDF per op type, downsampled to `points` (latency_us, fraction) pairs."""
    types = np.concatenate([np.frombuffer(r.types, dtype=np.int8) for r in results])
    lat = np.concatenate([np.frombuffer(r.latency_ns, dtype=np.int64) for r in results])
    errs = np.concatenate([np.frombuffer(r.errors, dtype=np.int32) for r in results])
    out: dict[str, list[list[float]]] = {}
    for t in OpType:
        m = (types == int(t)) & (errs >= 0)
        if not m.any():
            continue
        s = np.sort(lat[m]) / 1000.0
        qs = np.linspace(0.0, 1.0, min(points, s.size))
        vals = np.quantile(s, qs)
        out[t.name] = [
            [round(float(v), 1), round(float(q), 4)] for v, q in zip(vals, qs, strict=True)
        ]
    return out


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if values else 0.0


def baseline_pairs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (trace, configuration) measured on both sides: median seconds and ops/s.

    Medians of the per-iteration times, since on a shared machine one
    disturbed iteration would move a mean. ``speedup`` is baseline time over
    current time (above 1: the current code is faster).
    """
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for run in doc["runs"]:
        daemon = run.get("daemon") or {}
        side = daemon.get("side")
        if side is None:
            continue
        cfg = run["label"].removesuffix(" (baseline)")
        by_key.setdefault((run["trace"], cfg), {})[side] = run
    rows = []
    for (trace, cfg), sides in by_key.items():
        if set(sides) != {"baseline", "current"}:
            continue
        row: dict[str, Any] = {"trace": trace, "config": cfg}
        for name, run in sides.items():
            times = run.get("iteration_s") or [run["elapsed_s"] / run["iterations"]]
            s = median(times)
            ops = run["total"]["ops"] // max(run["iterations"], 1)
            row["ops"] = ops
            row[name] = {
                "median_s": round(s, 4),
                "ops_per_s": round(ops / s, 1) if s > 0 else 0.0,
                "min_s": round(min(times), 4),
                "max_s": round(max(times), 4),
                "n": len(times),
            }
        b, c = row["baseline"]["median_s"], row["current"]["median_s"]
        row["speedup"] = round(b / c, 3) if c > 0 else None
        rows.append(row)
    return rows
