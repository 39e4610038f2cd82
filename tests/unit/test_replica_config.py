"""The read replica's configuration: a snapshot is served read-only or not at all."""

from __future__ import annotations

import pytest

from portalbd.config import ConfigError, parse


def test_snapshot_needs_read_only() -> None:
    with pytest.raises(ConfigError) as err:
        parse('[device]\nsnapshot = "s1"\n')
    assert "device.snapshot: serving a snapshot needs device.read_only (--read-only)" in str(
        err.value
    )


def test_read_only_snapshot_loads() -> None:
    config = parse('[device]\nread_only = true\nsnapshot = "s1"\n')
    assert (config.device.read_only, config.device.snapshot) == (True, "s1")
