"""Keeping what the daemon stores private, and its secret files in check.

SlateDB creates its files itself (from Rust, with the process umask), so the
one way to make every file and directory of a ``file://`` store 0600/0700,
whatever umask the operator has, is to set the process umask to 0o077 before
storage opens (:func:`make_private`) and to chmod the storage root. What the
daemon creates afterwards for others to use (trace files and directories, the
NBD socket's directory) gets the mode it always had from the operator's umask,
set explicitly with :func:`shared_mode`.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("portalbd")

PRIVATE_UMASK = 0o077

_operator_umask: int | None = None  # the umask the daemon was started with


def make_private() -> None:
    """Set the process umask to 0o077, remembering the operator's (idempotent)."""
    global _operator_umask
    previous = os.umask(PRIVATE_UMASK)
    if _operator_umask is None:
        _operator_umask = previous


def shared_mode(mode: int) -> int:
    """``mode`` as the operator's umask would have left it (for files meant to be shared)."""
    umask = _operator_umask
    if umask is None:  # not made private: the current umask applies already
        umask = os.umask(0)
        os.umask(umask)
    return mode & ~umask


def make_shared_dirs(path: Path) -> None:
    """``mkdir -p`` with the operator's umask: directories others may need to traverse."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        os.chmod(created, shared_mode(0o777))


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700, and make it 0700 if it exists and is ours.

    The root of a ``file://`` store: with it 0700 nothing below is reachable
    by other users, including files an older portalbd left 0644.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
        os.chmod(path, 0o700)
    elif stat.S_IMODE(info.st_mode) & 0o077:
        log.warning(
            "storage directory %s is mode %o and owned by uid %d, not us: "
            "other users may read the disk's data",
            path,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
        )


def check_secret_file(path: Path, what: str) -> None:
    """Warn when a file holding a secret (a key, credentials) is readable by other users."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # whoever reads it says why it cannot be read
    if mode & stat.S_IROTH:
        log.warning(
            "%s %s is readable by other users (mode %o): chmod o-r it (0600 or 0640)",
            what,
            path,
            mode,
        )
