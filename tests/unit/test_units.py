"""`portalbd.units`: portalctl's formats, which the TUI now shares.

portalctl's output is read by people and scraped by scripts, so these
strings are pinned here exactly.
"""

from __future__ import annotations

import pytest

from portalbd.units import (
    human_duration,
    human_elapsed_ns,
    human_latency,
    human_size,
    human_time,
)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1 << 30, "1.0 GiB"),
        (int(23.7 * (1 << 30)), "23.7 GiB"),
        (1023 * 1024**5, "1023.0 PiB"),
        (1024**6, "1.0 EiB"),  # not 1024.0 PiB (issue 18)
        (5 * 1024**6, "5.0 EiB"),
        (2**64 - 1, "16.0 EiB"),  # the largest size NBD can carry
        (3 * 1024**7, "3072.0 EiB"),  # beyond: EiB stays the largest unit
    ],
)
def test_sizes_in_binary_units_with_one_decimal(n: int, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0s"),
        (59.94, "59.9s"),
        (60, "1m 00s"),
        (312, "5m 12s"),
        (7300, "2h 01m 40s"),
        (3 * 86400 + 4 * 3600 + 5 * 60 + 9, "3d 04h 05m"),
    ],
)
def test_durations_keep_whole_units_padded(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_latency_and_time() -> None:
    assert [human_latency(us) for us in (80, 999.4, 1000, 1530)] == [
        "80us",
        "999us",
        "1.0ms",
        "1.5ms",
    ]
    assert human_time(0) == "1970-01-01 00:00:00 UTC"


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (830_000, "830 µs"),
        (12_500_000, "12.5 ms"),
        (1_250_000_000, "1.25 s"),  # portalbd-trace info, not 1250000000
        (312 * 10**9, "5m 12s"),
    ],
)
def test_elapsed_nanoseconds_for_people(ns: int, text: str) -> None:
    assert human_elapsed_ns(ns) == text
