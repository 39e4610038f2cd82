"""syncfs of a local store's filesystem (store/localsync.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from portalbd.store.localsync import sync_filesystem


def test_a_directory_is_synced_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    sync_filesystem(tmp_path)
    with pytest.raises(FileNotFoundError, match="gone"):
        sync_filesystem(tmp_path / "gone")
