"""Turning numbers into short, fixed-width-friendly strings for table cells.

Sizes and durations follow the daemon's rules (`portalbd.units`, what
portalctl prints), so a number reads the same in both tools. Every formatter
returns a dash for unknown values so that a daemon that has not
answered yet, or an older daemon without a field, renders as "no data" rather
than as a misleading zero.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from portalbd.units import human_duration, human_size

DASH = "—"
_BARS = "▁▂▃▄▅▆▇█"


def fmt_bytes(n: float | None) -> str:
    """A size as portalctl writes it ("1.5 GiB", "640.0 MiB")."""
    return DASH if n is None else human_size(n)


def ellipsize(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with an ellipsis.

    For table cells fed by users (snapshot names up to 128 characters, URLs):
    one long value must not push every other column off screen.
    """
    if width < 1:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_mib_s(bytes_per_s: float | None) -> str:
    """Throughput in MiB/s: the unit operators compare disks in."""
    if bytes_per_s is None:
        return DASH
    mib = bytes_per_s / (1024 * 1024)
    if mib == 0:
        return "0"
    if mib < 0.1:
        return "<0.1"
    if mib < 10:
        return f"{mib:.1f}"
    return f"{mib:.0f}"


def fmt_count(x: float | None) -> str:
    """Rates and counts compacted with k/M so columns stay narrow."""
    if x is None:
        return DASH
    if x < 0:
        x = 0
    if x < 1000:
        return f"{x:.0f}" if x >= 10 or x == int(x) else f"{x:.1f}"
    if x < 1_000_000:
        return f"{x / 1000:.1f}k"
    return f"{x / 1_000_000:.1f}M"


def fmt_latency_us(us: float | None) -> str:
    """Microseconds shown in the largest unit that keeps the number small."""
    if us is None:
        return DASH
    if us < 1000:
        return f"{us:.0f}µs"
    if us < 1_000_000:
        ms = us / 1000
        return f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"
    return f"{us / 1_000_000:.2f}s"


def fmt_duration(seconds: float | None) -> str:
    """A duration (an uptime, a chart's span) as portalctl writes it ("5m 12s")."""
    return DASH if seconds is None else human_duration(seconds)


def fmt_time(unix: float | None) -> str:
    """Local wall-clock time; snapshots are named and found by people, in their zone."""
    if unix is None:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def fmt_clock(unix: float) -> str:
    """Time of day for event lines, where the date is rarely in question."""
    return time.strftime("%H:%M:%S", time.localtime(unix))


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters, scaled to their own maximum.

    Used inside table cells, where a Sparkline widget cannot go. Left-padded with
    spaces so that a new instance's short history grows from the right.
    """
    if width <= 0:
        return ""
    tail = list(values)[-width:]
    top = max(tail, default=0.0)
    if top <= 0:
        chars = [_BARS[0]] * len(tail)
    else:
        last = len(_BARS) - 1
        chars = [_BARS[min(last, max(0, round(v / top * last)))] for v in tail]
    return " " * (width - len(tail)) + "".join(chars)


_EIGHTHS = " ▁▂▃▄▅▆▇█"


def bar_rows(values: Sequence[float], width: int, height: int) -> list[str]:
    """A bar chart `height` rows tall, newest value at the right, in eighth-blocks.

    Scaled to the largest value shown, so the shape is readable at any load;
    the caller prints that peak next to the chart. A non-zero value always gets
    at least one eighth so that light activity is visible against idle time.
    """
    if width <= 0 or height <= 0:
        return []
    tail = list(values)[-width:]
    top = max(tail, default=0.0)
    steps = height * 8
    levels = []
    for v in tail:
        level = 0 if top <= 0 or v <= 0 else max(1, round(v / top * steps))
        levels.append(level)
    levels = [0] * (width - len(levels)) + levels
    rows = []
    for r in range(height - 1, -1, -1):  # top row first
        rows.append("".join(_EIGHTHS[min(8, max(0, lv - r * 8))] for lv in levels))
    return rows


def resample(values: Sequence[float], width: int, combine: str = "mean") -> list[float]:
    """At most `width` points covering all of `values`, oldest first.

    A chart narrower than its history would otherwise show only the last
    `width` seconds; instead each column summarises a run of neighbouring
    samples: their mean for rates, their max for latencies (a spike must not
    be averaged away).
    """
    values = list(values)  # deques (the history) cannot be sliced
    n = len(values)
    if width <= 0:
        return []
    if n <= width:
        return values
    out = []
    for col in range(width):
        chunk = values[col * n // width : (col + 1) * n // width]
        out.append(max(chunk) if combine == "max" else sum(chunk) / len(chunk))
    return out
