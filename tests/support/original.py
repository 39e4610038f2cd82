"""Disks in the original (Rust) portalbd's layout, built with the SlateDB binding.

The layout as the original's source has it: one SlateDB (``<dir>/portalbd``
for ``file:///dir``, ``<path>`` for ``s3://bucket/path``), raw 64 KiB
blocks under 8-byte big-endian block numbers, snapshots as named
checkpoints, no metadata key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from portalbd.config import S3Config
from portalbd.store.binding import sdb
from portalbd.store.location import parse_storage_url
from portalbd.store.original import ORIGINAL_BLOCK_SIZE, original_database_path

# The original README's configuration, byte for byte.
README_CONFIG = """\
[device]
disk_size_gb = 10

[storage]
url = "s3://bucket/path"
# (omit for in-memory)

[nbd]
address = "127.0.0.1:10809"
socket = "/run/portalbd/portalbd.sock"

[lsm]
flush_interval_ms = 1000
l0_sst_size_bytes = 67108864
"""


def original_block(tag: int) -> bytes:
    unit = f"<original {tag:08d}>".encode()
    return (unit * (ORIGINAL_BLOCK_SIZE // len(unit) + 1))[:ORIGINAL_BLOCK_SIZE]


async def _write(object_store: Any, path: str, blocks: Mapping[int, bytes], snapshot: str) -> None:
    db = await sdb.DbBuilder(path, object_store).build()
    for index, data in blocks.items():
        await db.put(index.to_bytes(8, "big"), data)
    await db.flush()
    if snapshot:
        admin = sdb.AdminBuilder(path, object_store).build()
        await admin.create_detached_checkpoint(
            sdb.CheckpointOptions(lifetime_ms=None, source=None, name=snapshot)
        )
    await db.shutdown()


def build_original_disk(
    storage_url: str,
    blocks: Mapping[int, bytes],
    *,
    snapshot: str = "",
    environ: Mapping[str, str] | None = None,
) -> str:
    """Write an original-layout disk where the original would for ``storage_url``.

    Returns the database path inside the object store. ``environ`` reaches
    an S3 server (moto) the way the daemon would.
    """
    location = parse_storage_url(storage_url)
    path = original_database_path(location)
    assert path is not None, "the original keeps nothing for memory://"
    if location.kind == "s3":
        from portalbd.store.s3 import build_object_store, resolve_settings

        store = build_object_store(resolve_settings(location, S3Config(), environ))
    else:
        store = sdb.ObjectStore.resolve(location.store_url)
    asyncio.run(_write(store, path, blocks, snapshot))
    return path
