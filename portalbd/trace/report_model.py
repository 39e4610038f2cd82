"""What `bench --report` shows, apart from how it is drawn: op colours, settings rows.

Kept free of matplotlib and HTML so the choices (which colour is Write,
which settings a reader needs first) are tested as plain data.
"""

from __future__ import annotations

from typing import Any

from portalbd.trace.format import OpType
from portalbd.units import human_size

# One colour per op type in every chart and table of a report, whatever ops a
# trace has (a colour taken from the plot order would make Write orange in one
# chart and blue in the next). Matplotlib's tab10, by NBD command.
OP_COLOURS: dict[str, str] = {
    OpType.Read.name: "#1f77b4",
    OpType.Write.name: "#ff7f0e",
    OpType.Flush.name: "#2ca02c",
    OpType.Trim.name: "#d62728",
    OpType.WriteZeroes.name: "#9467bd",
    OpType.Cache.name: "#8c564b",
    OpType.BlockStatus.name: "#e377c2",
    OpType.Disconnect.name: "#7f7f7f",
}
TOTAL_COLOUR = "#333333"  # "all ops" figures, never an op's colour
SIDE_HATCH = {"baseline": "//", "current": ""}


def colour(op: str) -> str:
    return OP_COLOURS.get(op, TOTAL_COLOUR)


def _size(value: Any) -> str:
    return human_size(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def plain(value: Any) -> str:
    return "-" if value is None else str(value)


def storage_kind(url: str | None) -> str:
    """memory, file or s3 from a storage URL (the path itself is the run's own)."""
    if not url:
        return "-"
    return url.split(":", 1)[0]


# (label, section, key, formatter): what decides a run's figures, first.
KEY_SETTINGS: tuple[tuple[str, str, str, Any], ...] = (
    ("storage", "storage", "url", storage_kind),
    ("block size", "device", "block_size", _size),
    ("device cache", "device", "cache_bytes", _size),
    ("dirty bytes", "device", "dirty_bytes", _size),
    ("io threads", "device", "io_threads", plain),
    ("flush interval ms", "lsm", "flush_interval_ms", plain),
    ("L0 SST size", "lsm", "l0_sst_size_bytes", _size),
    ("max unflushed", "lsm", "max_unflushed_bytes", _size),
    ("SlateDB block cache", "lsm", "block_cache_size_bytes", _size),
    ("object cache", "lsm", "object_cache_bytes", _size),
    ("compression", "lsm", "compression_codec", plain),
    ("SST block size", "lsm", "sst_block_size", plain),
)


def key_settings(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """The settings a reader compares runs by, as (label, value); absent ones left out.

    A setting the daemon does not have (an older baseline without
    io_threads) is left out rather than shown as a default it never had.
    """
    rows = []
    for label, section, key, fmt in KEY_SETTINGS:
        table = settings.get(section)
        if isinstance(table, dict) and key in table:
            rows.append((label, fmt(table[key])))
    return rows


def flatten(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Every setting as ("section.key", value), in the daemon's own order."""
    rows: list[tuple[str, str]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, plain(value)))
    return rows


def provenance_line(daemon: dict[str, Any] | None) -> str:
    """'portalbd 0.1.0 (commit 1a8edb4316, /work/tree)' for the daemon a run measured."""
    if not daemon:
        return "daemon: not reported"
    version = daemon.get("version") or "unknown version"
    where = ", ".join(
        x for x in (f"commit {daemon['commit']}" if daemon.get("commit") else "",
                    daemon.get("tree") or "") if x
    )  # fmt: skip
    side = " [baseline]" if daemon.get("side") == "baseline" else ""
    return f"portalbd {version}{side}" + (f" ({where})" if where else "")
