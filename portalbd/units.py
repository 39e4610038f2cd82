"""How portalbd writes sizes, durations, latencies and times for people.

portalctl's output is a surface operators read and scripts scrape, so its
rules are the daemon's rules; the TUI shows the same numbers the same way,
so a size or an uptime reads alike wherever it appears. Pure functions.
"""

from __future__ import annotations

import time


def human_size(n: float) -> str:
    """Binary units with one decimal, as operators read disk sizes.

    Up to EiB: a 1 EiB disk (the largest NBD sizes people try) reads
    ``1.0 EiB``, not ``1024.0 PiB``.
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        n /= 1024
        if n < 1024 or unit == "EiB":
            break
    return f"{n:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """Tenths under a minute; above, whole units down to the second (minutes for days)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, whole = divmod(whole, 86400)
    hours, whole = divmod(whole, 3600)
    minutes, secs = divmod(whole, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def human_elapsed_ns(ns: int) -> str:
    """A measured span, from nanoseconds: "830 µs", "12.5 ms", "1.25 s", "5m 12s"."""
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    if ns < 60_000_000_000:
        return f"{ns / 1e9:.2f} s"
    return human_duration(ns / 1e9)


def human_time(unix: float) -> str:
    """UTC, so the same snapshot reads the same on every machine."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def human_latency(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:.1f}ms"
    return f"{us:.0f}us"
