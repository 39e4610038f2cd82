"""What a daemon stores is its own: file:// storage is 0600/0700 whatever the umask.

SlateDB creates the files (from Rust), so this runs the real daemon under a
umask that would make them world-readable and looks at every path it made.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import DaemonFactory
from tests.support import connected


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The umask children inherit (the daemon is started inside)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_storage_files_are_private_under_a_permissive_umask(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    data = tmp_path / "disks" / "d0"
    with umask(0):
        daemon = daemon_factory("--flush-interval-ms", "10", storage_url=f"file://{data}")
    with connected(daemon.uri) as nbd:
        nbd.pwrite(os.urandom(1 << 20), 0)
        nbd.flush()
    # What is meant for others keeps its explicit mode: the control socket.
    assert stat.S_IMODE(daemon.control_socket.stat().st_mode) == 0o660
    assert daemon.stop() == 0
    found = modes(data)
    assert len(found) > 5, found  # catalog, generation, WAL, manifest, SSTs
    loose = {
        path: oct(mode)
        for path, mode in found.items()
        if mode != (0o700 if (data / path).is_dir() else 0o600)
    }
    assert loose == {}


def test_an_existing_storage_root_is_made_private(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    data = tmp_path / "old"
    data.mkdir(mode=0o755)
    (data / "left-by-an-older-portalbd").write_text("x")
    os.chmod(data, 0o755)
    daemon = daemon_factory(storage_url=f"file://{data}")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert daemon.stop() == 0
