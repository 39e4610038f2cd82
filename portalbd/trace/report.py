"""`bench --report DIR`: one self-contained HTML page with matplotlib charts.

The charts are written as SVG files next to index.html (and referenced from
it), so the page opens from disk or any static file server with no scripts.
Each op type keeps one colour everywhere (report_model.OP_COLOURS); the
rate over time has a panel per op with its own scale, so a trim covering
the whole disk in one burst does not flatten the reads and writes beside it.
SVG text stays text and every op's artists carry an id (``op-Write``...),
so the charts can be searched and checked.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from portalbd import __version__
from portalbd.trace import report_model as model
from portalbd.trace import results

plt.rcParams["svg.fonttype"] = "none"  # labels as <text>, not glyph outlines
plt.rcParams["svg.hashsalt"] = "portalbd"  # the same ids for the same chart


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)
    return path.name


def _short(run: dict[str, Any]) -> str:
    return f"{Path(run['trace']).name.split('.')[0]}\n{run['label']}"


def _side(run: dict[str, Any]) -> str:
    return str((run.get("daemon") or {}).get("side", "current"))


def _throughput_chart(run: dict[str, Any], path: Path) -> str:
    """A panel per op type, each on its own scale; MiB/s where the op moves bytes."""
    tl = run.get("timeline") or {}
    step = float(tl.get("bucket_s", 1.0))
    mib = tl.get("mib_per_s") or {}
    ops = tl.get("ops_per_s") or {}
    names = [n for n in model.OP_COLOURS if n in ops or n in mib]
    fig, axes = plt.subplots(
        max(len(names), 1), 1, sharex=True, figsize=(7, 0.3 + 1.25 * max(len(names), 1)),
        squeeze=False,
    )  # fmt: skip
    for ax, name in zip(axes[:, 0], names, strict=False):
        series, unit = (mib[name], "MiB/s") if name in mib else (ops[name], "ops/s")
        (line,) = ax.plot(
            [i * step for i in range(len(series))], series, color=model.colour(name), lw=1.2
        )
        line.set_gid(f"op-{name}")
        ax.set_gid(f"panel-{name}")
        ax.set_ylabel(f"{name}\n{unit}", fontsize="small")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("rate over time, a panel per op (own scale each)")
    axes[-1, 0].set_xlabel("time in the last measured iteration (s)")
    return _save(fig, path)


def _cdf_chart(run: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, points in (run.get("cdf") or {}).items():
        xs = [max(p[0], 0.1) for p in points]
        ys = [p[1] for p in points]
        (line,) = ax.step(xs, ys, where="post", label=name, color=model.colour(name))
        line.set_gid(f"op-{name}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency CDF per op type")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _summary_chart(runs: list[dict[str, Any]], path: Path) -> str:
    """Total MiB/s per run, and ops/s per op on a log axis (Flush next to Write)."""
    n = len(runs)
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(max(6, 0.9 * n + 2), 6), height_ratios=(1, 1.3)
    )
    xs = range(n)
    bars = top.bar(xs, [r["total"]["mib_per_s"] for r in runs], color=model.TOTAL_COLOUR)
    for bar, run in zip(bars, runs, strict=True):
        bar.set_hatch(model.SIDE_HATCH.get(_side(run), ""))
        bar.set_edgecolor("white")
    top.set_ylabel("MiB/s (all ops)")
    top.set_title("throughput per configuration")
    names = [n for n in model.OP_COLOURS if any(n in r["by_type"] for r in runs)]
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        for i, run in enumerate(runs):
            figures = run["by_type"].get(name)
            if figures is None or figures["ops_per_s"] <= 0:
                continue
            x = i - 0.4 + (j + 0.5) * width
            (bar,) = bottom.bar(x, figures["ops_per_s"], width, color=model.colour(name))
            bar.set_gid(f"op-{name}-{i}")
    bottom.set_yscale("log")
    bottom.set_gid("ops-per-op")
    bottom.set_ylabel("ops/s per op (log scale)")
    handles = [Patch(color=model.colour(n)) for n in names]
    if handles:
        bottom.legend(
            handles, names, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0)
        )
    bottom.grid(alpha=0.3, axis="y")
    bottom.set_xticks(list(xs), [_short(r) for r in runs], rotation=30, ha="right",
                      fontsize="x-small")  # fmt: skip
    return _save(fig, path)


def _iterations(run: dict[str, Any]) -> str:
    rounds = int(run.get("rounds", 1))
    each = f"{run['iterations'] // rounds} measured iteration(s) after {run['warmup']} warm-up"
    measured = f"{run['elapsed_s']:.2f} s measured"
    if rounds == 1:
        return f"{each}, {measured}"
    return f"{rounds} fresh daemons, each {each}; {measured} in all"


def _swatch(name: str) -> str:
    return (
        f'<span class=swatch style="background:{model.colour(name)}" '
        f'data-op="{html.escape(name)}"></span>'
    )


def _table(run: dict[str, Any]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("op", "ops", "ops/s", "MiB/s", "p50 us", "p90", "p99", "p99.9", "max", "errors")
    )
    rows = []
    for name, f in [*run["by_type"].items(), ("total", run["total"])]:
        lat = f["latency_us"]
        cells = [f["ops"], f"{f['ops_per_s']:.0f}", f"{f['mib_per_s']:.1f}"]
        cells += [f"{lat[k]:.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")] + [f["errors"]]
        op = (_swatch(name) if name != "total" else "") + html.escape(name)
        rows.append(
            f"<tr><td>{op}</td>"
            + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + "</tr>"
        )
    store = run.get("store")
    store_line = (
        "<p>object store: " + html.escape(", ".join(f"{k}={v}" for k, v in store.items())) + "</p>"
        if store
        else "<p>object store: not reported</p>"
    )
    return f"<table>{''.join([f'<tr>{head}</tr>', *rows])}</table>{store_line}"


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def _configuration(run: dict[str, Any]) -> str:
    """The daemon's own resolved settings (its --print-config), the ones that matter first."""
    daemon = run.get("daemon")
    parts = [f"<p class=daemon>{html.escape(model.provenance_line(daemon))}</p>"]
    settings = (daemon or {}).get("settings")
    if not settings:
        swept = [(k, model.plain(v)) for k, v in (run.get("config") or {}).items()]
        parts.append("<p>daemon settings: not reported; the bench asked for:</p>")
        parts.append(f"<table class=settings>{_rows(swept)}</table>")
        return "".join(parts)
    parts.append(f"<table class=settings>{_rows(model.key_settings(settings))}</table>")
    parts.append(
        "<details><summary>every setting</summary>"
        f"<table class=settings>{_rows(model.flatten(settings))}</table></details>"
    )
    return "".join(parts)


def _baseline_table(doc: dict[str, Any]) -> str:
    pairs = results.baseline_pairs(doc)
    if not pairs:
        return ""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("trace", "config", "ops", "baseline s", "ops/s", "current s", "ops/s", "speedup")
    )
    rows = []
    for row in pairs:
        b, c = row["baseline"], row["current"]
        speedup = "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        cells = [Path(row["trace"]).name, row["config"], row["ops"], f"{b['median_s']:.3f}",
                 f"{b['ops_per_s']:.0f}", f"{c['median_s']:.3f}", f"{c['ops_per_s']:.0f}",
                 speedup]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    base = doc.get("baseline") or {}
    return (
        "<h2>baseline vs current</h2>"
        f"<p>medians of the measured iterations; baseline {html.escape(str(base.get('tree')))} "
        f"(commit {html.escape(str(base.get('commit')))})</p>"
        f"<table class=baseline><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _header(doc: dict[str, Any]) -> str:
    tool = doc.get("portalbd") or {}
    host = doc.get("host") or {}
    version = tool.get("version", "not recorded")
    commit = f", commit {tool['commit']}" if tool.get("commit") else ""
    lines = [
        f"created {doc.get('created', '')}",
        f"portalbd-trace {version}{commit} (this report: portalbd {__version__})",
        "host: " + ", ".join(f"{k} {v}" for k, v in host.items()) if host else "",
    ]
    return "".join(f"<p class=meta>{html.escape(x)}</p>" for x in lines if x)


STYLE = (
    "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
    "table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ccc;padding:2px 6px;"
    "text-align:right}table.settings th{text-align:left;font-weight:normal}"
    ".swatch{display:inline-block;width:.8em;height:.8em;margin-right:4px}"
    "img{max-width:100%}</style>"
)


def write(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    runs = doc["runs"]
    parts = [
        "<!doctype html><meta charset=utf-8><title>portalbd trace bench</title>",
        STYLE,
        "<h1>portalbd trace bench</h1>",
        _header(doc),
    ]
    if runs:
        parts.append(f'<img src="{_summary_chart(runs, out / "summary.svg")}" alt="summary">')
    parts.append(_baseline_table(doc))
    for i, run in enumerate(runs):
        title = f"{Path(run['trace']).name} [{run['label']}]"
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<p>{html.escape(_iterations(run))}</p>")
        parts.append(_configuration(run))
        parts.append(_table(run))
        tp = _throughput_chart(run, out / f"run{i}-throughput.svg")
        cdf = _cdf_chart(run, out / f"run{i}-cdf.svg")
        parts.append(f'<img src="{tp}" alt="throughput"><img src="{cdf}" alt="latency CDF">')
    index = out / "index.html"
    index.write_text("\n".join(p for p in parts if p) + "\n")
    return index
