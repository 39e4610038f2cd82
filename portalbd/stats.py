"""Live statistics: counters and latency histograms that cost nanoseconds.

Histograms use fixed logarithmic buckets (four per power of two) so that
recording is one ``bit_length`` and an increment, and percentiles are
computed only when someone asks (status, metrics, the TUI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_SUB = 4  # buckets per power of two
_BUCKETS = 64 * _SUB


class Histogram:
    """Latencies in nanoseconds; percentiles within about 19%."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0
        self.max = 0

    @staticmethod
    def _bucket(value: int) -> int:
        if value < 1:
            return 0
        exponent = value.bit_length() - 1
        if exponent < 2:
            return exponent * _SUB
        fraction = (value >> (exponent - 2)) & 0b11
        return min(exponent * _SUB + fraction, _BUCKETS - 1)

    @staticmethod
    def _upper(bucket: int) -> int:
        exponent, fraction = divmod(bucket, _SUB)
        if exponent < 2:
            return 1 << exponent
        return (1 << exponent) + ((fraction + 1) << (exponent - 2))

    def record(self, value: int) -> None:
        self.counts[self._bucket(value)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def percentile(self, p: float) -> int:
        if not self.count:
            return 0
        rank = max(1, round(self.count * p / 100))
        seen = 0
        for bucket, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self._upper(bucket), self.max)
        return self.max

    def summary_us(self) -> dict[str, float]:
        def us(ns: int) -> float:
            return round(ns / 1000, 1)

        return {
            "count": self.count,
            "p50": us(self.percentile(50)),
            "p90": us(self.percentile(90)),
            "p99": us(self.percentile(99)),
            "p999": us(self.percentile(99.9)),
            "max": us(self.max),
            "mean": us(self.total // self.count) if self.count else 0.0,
        }


COMMAND_NAMES = {
    0: "read",
    1: "write",
    2: "disc",
    3: "flush",
    4: "trim",
    5: "cache",
    6: "write_zeroes",
    7: "block_status",
}


@dataclass(slots=True)
class ServerStats:
    connections: int = 0
    connections_total: int = 0
    connections_refused: int = 0
    inflight: int = 0
    inflight_max: int = 0
    errors: int = 0
    fua_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    commands: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(COMMAND_NAMES.values(), 0)
    )
    latency: dict[str, Histogram] = field(default_factory=dict)
    request_sizes: dict[int, int] = field(default_factory=dict)
    flush_latency: Histogram = field(default_factory=Histogram)

    def request_done(self, command: int, length: int, duration_ns: int, error: int) -> None:
        name = COMMAND_NAMES.get(command, "unknown")
        self.commands[name] = self.commands.get(name, 0) + 1
        histogram = self.latency.get(name)
        if histogram is None:
            histogram = self.latency[name] = Histogram()
        histogram.record(duration_ns)
        if error:
            self.errors += 1
        elif command == 0:
            self.bytes_read += length
        elif command == 1:
            self.bytes_written += length
        if command in (0, 1):
            bucket = 1 << max(9, (length - 1).bit_length()) if length else 0
            self.request_sizes[bucket] = self.request_sizes.get(bucket, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "inflight": self.inflight,
            "inflight_max": self.inflight_max,
            "commands": dict(self.commands),
            "fua_writes": self.fua_writes,
            "errors": self.errors,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "latency_us": {k: v.summary_us() for k, v in self.latency.items()},
            "request_sizes": {str(k): v for k, v in sorted(self.request_sizes.items())},
            "flush_count": self.flush_latency.count,
            "flush_latency_us": self.flush_latency.summary_us(),
        }
