"""Disks made by the original portalbd (the Rust project): found, never blanked.

The original keeps one SlateDB per disk: at ``<dir>/portalbd`` for
``file:///dir`` and at ``<path>`` itself for ``s3://bucket/path``; its keys
are 8-byte big-endian block numbers and its values raw 64 KiB blocks. It
records no size and no metadata key (the size comes from its config). This
portalbd keeps a ``catalog`` database and ``gen/NNNNNNNN`` beside it, so
without this check it would create an empty disk next to the user's data
and serve zeros, and a mkfs on that would lose the disk for good.

Only the manifest is read (through the admin API, which opens nothing), so
detecting writes nothing and fences no one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from portalbd.store.binding import sdb
from portalbd.store.location import StorageLocation

ORIGINAL_BLOCK_SIZE = 64 * 1024


class OriginalLayoutError(Exception):
    """The storage holds the original's layout; the message says how to migrate."""


@dataclass(frozen=True, slots=True)
class OriginalDisk:
    path: str  # the database path inside the object store
    checkpoints: tuple[str, ...]  # names of its named checkpoints (its snapshots)


def original_database_path(location: StorageLocation) -> str | None:
    """Where the original would keep this URL's database (None: memory, nothing persists)."""
    if location.kind == "file":
        return location.path("portalbd")
    if location.kind == "s3":
        return location.prefix
    return None


async def has_database(object_store: Any, path: str) -> bool:
    """True when a SlateDB manifest exists at ``path``.

    A missing manifest and an unreachable store look the same here; an
    unreachable store fails the open that follows with its own message.
    """
    return await _checkpoints(object_store, path) is not None


async def _checkpoints(object_store: Any, path: str) -> list[Any] | None:
    try:
        admin = sdb.AdminBuilder(path, object_store).build()
        return list(await admin.list_checkpoints(None))
    except sdb.Error:
        return None


async def find_original(object_store: Any, location: StorageLocation) -> OriginalDisk | None:
    path = original_database_path(location)
    if path is None:
        return None
    checkpoints = await _checkpoints(object_store, path)
    if checkpoints is None:
        return None
    names = tuple(sorted(str(c.name) for c in checkpoints if c.name))
    return OriginalDisk(path, names)


def refusal(location: StorageLocation, disk: OriginalDisk) -> str:
    """The message that stops the daemon: what was found, why not served, how to move it."""
    where = f"/{disk.path}" if location.kind == "file" else f"s3 key prefix {disk.path!r}"
    snapshots = (
        f"; its snapshots: {', '.join(disk.checkpoints)}" if disk.checkpoints else "; no snapshots"
    )
    return (
        f"storage {location.display} holds a disk of the original (Rust) portalbd: "
        f"one SlateDB at {where} with raw {ORIGINAL_BLOCK_SIZE // 1024} KiB blocks under "
        f"8-byte block numbers{snapshots}. This portalbd keeps a catalog and "
        "generations (catalog/, gen/) and does not read that layout in place; refusing "
        "to start rather than serve an empty disk beside it. Nothing was written. "
        "To migrate: serve it with the original portalbd, start this portalbd on a new "
        "storage URL with the same size (--disk-size-gb as the original's "
        "device.disk_size_gb) and copy the device across, e.g. "
        "`nbdcopy nbd://ORIGINAL_HOST:PORT/portalbd nbd://NEW_HOST:PORT/portalbd`; "
        "take each snapshot you need the same way after restoring it in the original. "
        "Or keep using the original on this storage."
    )
