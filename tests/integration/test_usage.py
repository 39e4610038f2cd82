"""Status reports the object storage an instance occupies."""

from __future__ import annotations

import time

from tests.conftest import DaemonFactory
from tests.support import connected


def test_file_storage_use_is_reported(daemon_factory: DaemonFactory, tmp_path: object) -> None:
    daemon = daemon_factory(storage_url=f"file://{tmp_path}/data")
    with connected(daemon.uri) as nbd:
        nbd.pwrite(b"u" * (4 << 20), 0)
        nbd.flush()
    deadline = time.monotonic() + 30
    used = None
    while time.monotonic() < deadline:
        used = daemon.status()["stats"].get("used_bytes")
        if used:
            break
        time.sleep(0.2)
    assert used is not None and used > 0


def test_memory_storage_reports_no_use(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    assert "used_bytes" not in daemon.status()["stats"]
