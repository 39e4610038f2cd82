"""Make a local directory's writes durable: SlateDB's file store never syncs.

SlateDB writes a ``file://`` database through a local object store that
writes and renames files but never calls fsync (strace of 20 NBD FLUSHes:
no fsync, fdatasync or syncfs at all). Its WAL flush therefore survives a
daemon crash but not a power cut or a kernel crash, and NBD FLUSH promises
the latter. ``syncfs`` on the directory's filesystem at the end of each
FLUSH round (and snapshot) makes everything written so far durable,
whichever files SlateDB touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def sync_filesystem(directory: Path) -> None:
    """syncfs(2) the filesystem holding ``directory`` (blocking: run it off the loop)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(directory))
    finally:
        os.close(fd)
