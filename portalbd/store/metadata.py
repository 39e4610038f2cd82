"""Device metadata: the geometry and format of a disk, checked at every open.

One JSON document under a reserved key outside the block key space. It
records the size, the block size and the layout format, so a disk is never
read with the wrong geometry or format, and (format 2) an *epoch* that every
open bumps: the high bits of the sequence numbers in stored values, which
must only ever grow on a disk (``store/envelope.py`` says why).

Formats:

* 1 - one raw value per block, holes are absent keys (portalbd 0.1).
  Still opened and served as it is, written in format 1.
* 2 - enveloped values (codec + sequence), page deltas under 10-byte keys.
  What new disks get.

A newer format, or a metadata document that cannot be parsed, is refused:
serving it would mean reading its blocks as something they are not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from portalbd import __version__
from portalbd.pages import Layout
from portalbd.store.slate import SlateHandle

log = logging.getLogger("portalbd.store")

META_KEY = b"\xffportalbd:device"  # outside the 8- and 10-byte block key space
FORMAT_LEGACY = 1
FORMAT_CURRENT = 2
PAGE_SIZE = 4096


class MetadataError(Exception):
    """The disk cannot be opened as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class DeviceMetadata:
    size_bytes: int
    block_size: int
    layout: Layout

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.layout.version,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
        }
        if self.layout.version >= 2:
            doc["page_size"] = self.layout.page_size
            doc["epoch"] = self.layout.epoch
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> DeviceMetadata:
        try:
            doc = json.loads(raw)
            version = doc["format"]
            size, block_size = int(doc["size_bytes"]), int(doc["block_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(
                f"the device metadata is unreadable ({exc}); refusing to guess"
            ) from exc
        if version == FORMAT_LEGACY:
            return cls(size, block_size, Layout(version=1))
        if version != FORMAT_CURRENT:
            raise MetadataError(
                f"device format {version} is not supported by portalbd {__version__} "
                f"(it reads formats {FORMAT_LEGACY} and {FORMAT_CURRENT}); "
                "use the portalbd that created this disk"
            )
        layout = Layout(
            version=FORMAT_CURRENT, page_size=int(doc["page_size"]), epoch=int(doc["epoch"])
        )
        return cls(size, block_size, layout)


async def read_metadata(data: SlateHandle) -> DeviceMetadata | None:
    raw = await data.get(META_KEY)
    return None if raw is None else DeviceMetadata.decode(raw)


async def write_metadata(data: SlateHandle, meta: DeviceMetadata) -> None:
    """Record the metadata durably (before any block is written with it)."""
    await data.write([(META_KEY, meta.encode())])
    await data.flush()


async def open_metadata(
    data: SlateHandle, requested: int | None, block_size: int, default_size: int
) -> DeviceMetadata:
    """Record the device geometry on first use; enforce it afterwards.

    Returns what to serve: growing is allowed (and recorded), shrinking would
    cut off data and is refused, as is a different block size. With no size
    requested an existing disk keeps its recorded one (a disk grown once
    must not need its size repeated at every start) and a new disk gets
    ``default_size``. The epoch is bumped and recorded before any write can
    use it.
    """
    meta = await read_metadata(data)
    if meta is None:
        layout = Layout(version=FORMAT_CURRENT, page_size=PAGE_SIZE, epoch=1)
        fresh = DeviceMetadata(default_size if requested is None else requested, block_size, layout)
        await write_metadata(data, fresh)
        return fresh
    if requested is None:
        log.info("no size given: serving the recorded %d bytes", meta.size_bytes)
    size = meta.size_bytes if requested is None else requested
    if meta.block_size != block_size:
        raise MetadataError(
            f"this disk was created with block_size {meta.block_size}; "
            f"it cannot be reopened with block_size {block_size} "
            f"(set [device] block_size = {meta.block_size})"
        )
    if size < meta.size_bytes:
        raise MetadataError(
            f"this disk is {meta.size_bytes} bytes; shrinking it to {size} bytes "
            "would lose data and is refused"
        )
    if size > meta.size_bytes:
        log.info("growing device from %d to %d bytes", meta.size_bytes, size)
    if meta.layout.version == FORMAT_LEGACY:
        log.info("device format 1 (whole raw blocks): served as it is")
        layout = meta.layout
    else:
        layout = Layout(
            version=meta.layout.version,
            page_size=meta.layout.page_size,
            epoch=meta.layout.epoch + 1,
        )
    opened = DeviceMetadata(size, block_size, layout)
    if opened != meta:
        await write_metadata(data, opened)
    return opened
