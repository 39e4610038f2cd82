"""`bench --report DIR`: one self-contained HTML page with matplotlib charts.

The charts are written as SVG files next to index.html (and referenced from
it), so the page opens from disk or any static file server with no scripts.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)
    return path.name


def _throughput_chart(run: dict[str, Any], path: Path) -> str:
    tl = run.get("timeline") or {}
    step = float(tl.get("bucket_s", 1.0))
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, series in (tl.get("mib_per_s") or {}).items():
        ax.plot([i * step for i in range(len(series))], series, label=name)
    ax.set_xlabel("time in last iteration (s)")
    ax.set_ylabel("MiB/s")
    ax.set_title("throughput over time")
    if ax.lines:
        ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def _cdf_chart(run: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, points in (run.get("cdf") or {}).items():
        xs = [max(p[0], 0.1) for p in points]
        ys = [p[1] for p in points]
        ax.step(xs, ys, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency CDF per op type")
    if ax.lines:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _summary_chart(runs: list[dict[str, Any]], path: Path) -> str:
    labels = [f"{Path(r['trace']).name.split('.')[0]}\n{r['label']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(runs) + 2), 3.5))
    ax.bar(range(len(runs)), [r["total"]["mib_per_s"] for r in runs])
    ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize="x-small")
    ax.set_ylabel("MiB/s (all ops)")
    ax.set_title("throughput per configuration")
    return _save(fig, path)


def _table(run: dict[str, Any]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("op", "ops", "ops/s", "MiB/s", "p50 us", "p90", "p99", "p99.9", "max", "errors")
    )
    rows = []
    for name, f in [*run["by_type"].items(), ("total", run["total"])]:
        lat = f["latency_us"]
        cells = [name, f["ops"], f"{f['ops_per_s']:.0f}", f"{f['mib_per_s']:.1f}"]
        cells += [f"{lat[k]:.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")] + [f["errors"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    store = run.get("store")
    store_line = (
        "<p>object store: " + html.escape(", ".join(f"{k}={v}" for k, v in store.items())) + "</p>"
        if store
        else "<p>object store: not reported</p>"
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{store_line}"


def write(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    runs = doc["runs"]
    parts = [
        "<!doctype html><meta charset=utf-8><title>portalbd trace bench</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}img{max-width:100%}</style>",
        f"<h1>portalbd trace bench</h1><p>{html.escape(doc.get('created', ''))}</p>",
    ]
    if runs:
        parts.append(f'<img src="{_summary_chart(runs, out / "summary.svg")}" alt="summary">')
    for i, run in enumerate(runs):
        title = f"{Path(run['trace']).name} [{run['label']}]"
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(
            f"<p>{run['iterations']} measured iteration(s) after {run['warmup']} warm-up, "
            f"{run['elapsed_s']:.2f} s measured</p>"
        )
        parts.append(_table(run))
        tp = _throughput_chart(run, out / f"run{i}-throughput.svg")
        cdf = _cdf_chart(run, out / f"run{i}-cdf.svg")
        parts.append(f'<img src="{tp}" alt="throughput"><img src="{cdf}" alt="latency CDF">')
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index
