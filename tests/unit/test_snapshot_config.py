"""``[snapshots]``: the schedule's keys, each mistake named with its key."""

from __future__ import annotations

import pytest

from portalbd.config import ConfigError, parse


def test_absent_section_means_no_schedule() -> None:
    assert parse("").snapshots.every_seconds() is None


def test_a_full_section_loads() -> None:
    snapshots = parse(
        '[snapshots]\nevery = "15m"\nkeep = 96\nkeep_daily = 7\nkeep_weekly = 4\n'
    ).snapshots
    assert (snapshots.every_seconds(), snapshots.keep) == (900, 96)
    assert (snapshots.keep_daily, snapshots.keep_weekly) == (7, 4)


@pytest.mark.parametrize(
    ("every", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("7d", 604800)]
)
def test_durations(every: str, seconds: int) -> None:
    assert parse(f'[snapshots]\nevery = "{every}"\nkeep = 1\n').snapshots.every_seconds() == seconds


DURATION_HELP = 'expected a whole number and a unit, s, m, h or d (e.g. "30s", "15m", "1h", "1d")'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('every = "15"\nkeep = 1', f"snapshots.every: {DURATION_HELP}, got '15'"),
        ('every = "0s"\nkeep = 1', f"snapshots.every: {DURATION_HELP}, got '0s'"),
        ('every = "1.5h"\nkeep = 1', f"snapshots.every: {DURATION_HELP}, got '1.5h'"),
        ('every = "1w"\nkeep = 1', f"snapshots.every: {DURATION_HELP}, got '1w'"),
        ('every = "8d"\nkeep = 1', "snapshots.every: at most 7d, got '8d'"),
        ("every = 900\nkeep = 1", "snapshots.every: expected a string, got an integer"),
        (
            'every = "15m"',
            "snapshots.keep: missing; say how many scheduled snapshots to keep (e.g. keep = 96)",
        ),
        (
            'every = "15m"\nkeep = 0',
            "snapshots.keep: must be at least 1 (the newest is always kept), got 0",
        ),
        ('every = "15m"\nkeep = 1\nkeep_daily = -1', "snapshots.keep_daily: must not be negative"),
        ('every = "1m"\nkeep = 1\nkeep_weekly = -2', "snapshots.keep_weekly: must not be negative"),
        (
            "keep = 96",
            "snapshots.keep: set without snapshots.every "
            '(how often to take one, e.g. every = "15m")',
        ),
        ("keep_weekly = 4", "snapshots.keep_weekly: set without snapshots.every"),
        ('every = "1h"\nkeep = 1\nkeep_hourly = 3', "snapshots.keep_hourly: unknown key"),
    ],
)
def test_mistakes_name_the_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(f"[snapshots]\n{body}\n", "disk.toml")
    assert str(err.value).startswith(f"disk.toml: {message}")


def test_a_read_only_replica_cannot_schedule() -> None:
    with pytest.raises(ConfigError) as err:
        parse('[device]\nread_only = true\n[snapshots]\nevery = "1h"\nkeep = 3\n')
    assert "snapshots.every: a read-only replica cannot take snapshots" in str(err.value)
