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
* 3 - format 2 with every value sealed: an encrypted disk (``--encryption-
  key-file``). The document adds ``encryption`` (cipher, the disk's random
  id, a key check derived from the key) and ``mac``, an HMAC of the rest
  under a key derived from the master key, so the recorded geometry and
  epoch cannot be altered unnoticed. Its own format number makes an older
  portalbd refuse the disk instead of writing plain values into it.

A newer format, or a metadata document that cannot be parsed, is refused:
serving it would mean reading its blocks as something they are not. So is
an encrypted disk opened without its key or with another one, and a plain
disk given a key: either way it would be opened as the other kind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from portalbd import __version__
from portalbd.pages import Layout
from portalbd.store.sealing import CIPHER, DISK_ID_SIZE, Sealer, key_check, new_disk_id
from portalbd.store.slate import SlateHandle

log = logging.getLogger("portalbd.store")

META_KEY = b"\xffportalbd:device"  # outside the 8- and 10-byte block key space
FORMAT_LEGACY = 1
FORMAT_CURRENT = 2
FORMAT_SEALED = 3
FORMATS = (FORMAT_LEGACY, FORMAT_CURRENT, FORMAT_SEALED)
PAGE_SIZE = 4096
KEY_OPTION = "--encryption-key-file / [storage] encryption_key_file"


class MetadataError(Exception):
    """The disk cannot be opened as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Encryption:
    """What the metadata of an encrypted disk records: no key, only how to check one."""

    disk_id: bytes
    key_check: str
    cipher: str = CIPHER


@dataclass(frozen=True, slots=True)
class DeviceMetadata:
    size_bytes: int
    block_size: int
    layout: Layout
    encryption: Encryption | None = None
    # The document as read from the store, which its MAC covers.
    raw: bytes = field(default=b"", compare=False, repr=False)

    def encode(self, sealer: Sealer | None = None) -> bytes:
        """The stored document; an encrypted disk's is authenticated with ``sealer``."""
        doc: dict[str, Any] = {
            "format": self.layout.version,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
        }
        if self.layout.version >= 2:
            doc["page_size"] = self.layout.page_size
            doc["epoch"] = self.layout.epoch
        if self.encryption is not None:
            if sealer is None or sealer.disk_id != self.encryption.disk_id:
                raise ValueError("the metadata of an encrypted disk needs that disk's sealer")
            doc["encryption"] = {
                "cipher": self.encryption.cipher,
                "disk_id": self.encryption.disk_id.hex(),
                "key_check": self.encryption.key_check,
            }
            doc["mac"] = sealer.mac(_canonical(doc))
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
            return cls(size, block_size, Layout(version=1), raw=raw)
        if version not in FORMATS:
            raise MetadataError(
                f"device format {version} is not supported by portalbd {__version__} "
                f"(it reads formats {', '.join(map(str, FORMATS))}); "
                "use the portalbd that created this disk"
            )
        try:
            layout = Layout(
                version=version, page_size=int(doc["page_size"]), epoch=int(doc["epoch"])
            )
            encryption = None
            if version == FORMAT_SEALED:
                sealed = doc["encryption"]
                encryption = Encryption(
                    disk_id=bytes.fromhex(sealed["disk_id"]),
                    key_check=str(sealed["key_check"]),
                    cipher=str(sealed["cipher"]),
                )
                if len(encryption.disk_id) != DISK_ID_SIZE:
                    raise ValueError(f"a disk id of {len(encryption.disk_id)} bytes")
                if not isinstance(doc["mac"], str):
                    raise TypeError("mac is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(
                f"the device metadata (format {version}) is unreadable ({exc}); refusing to guess"
            ) from exc
        if encryption is not None and encryption.cipher != CIPHER:
            raise MetadataError(
                f"this disk is encrypted with {encryption.cipher!r}, which portalbd "
                f"{__version__} does not know (it uses {CIPHER})"
            )
        return cls(size, block_size, layout, encryption, raw)


def _canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a metadata MAC covers: the document without its MAC, keys sorted."""
    return json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True).encode()


def unlock(meta: DeviceMetadata, key: bytes | None) -> Sealer | None:
    """The sealer of the disk ``meta`` describes, given the operator's key (or none).

    Refuses every mismatch, so a disk is only ever opened as what it is: an
    encrypted disk without its key or with another, a plain disk with a key,
    and metadata whose MAC does not match.
    """
    if meta.encryption is None:
        if key is not None:
            raise MetadataError(
                f"this disk is not encrypted (device format {meta.layout.version}) but an "
                f"encryption key was given ({KEY_OPTION}); refusing to open it either way. "
                "Drop the key to serve it as it is, or copy its data onto a new encrypted "
                "disk (docs/security.md)"
            )
        return None
    if key is None:
        raise MetadataError(f"this disk is encrypted; give its key with {KEY_OPTION}")
    if key_check(key, meta.encryption.disk_id) != meta.encryption.key_check:
        raise MetadataError(
            "the encryption key does not match this disk (wrong key file?); refusing to open it"
        )
    sealer = Sealer(key, meta.encryption.disk_id)
    doc = json.loads(meta.raw)
    if not sealer.mac_matches(_canonical(doc), str(doc["mac"])):
        raise MetadataError(
            "the device metadata fails authentication (altered in the store?); "
            "refusing to open this disk"
        )
    return sealer


async def read_metadata(data: SlateHandle) -> DeviceMetadata | None:
    raw = await data.get(META_KEY)
    return None if raw is None else DeviceMetadata.decode(raw)


async def write_metadata(
    data: SlateHandle, meta: DeviceMetadata, sealer: Sealer | None = None
) -> None:
    """Record the metadata durably (before any block is written with it)."""
    await data.write([(META_KEY, meta.encode(sealer))])
    await data.flush()


async def open_metadata(
    data: SlateHandle,
    requested: int | None,
    block_size: int,
    default_size: int,
    key: bytes | None = None,
) -> tuple[DeviceMetadata, Sealer | None]:
    """Record the device geometry on first use; enforce it afterwards.

    Returns what to serve and, for an encrypted disk, its sealer: growing is
    allowed (and recorded), shrinking would cut off data and is refused, as
    is a different block size and a key that does not fit the disk
    (:func:`unlock`). With no size requested an existing disk keeps its
    recorded one (a disk grown once must not need its size repeated at every
    start) and a new disk gets ``default_size``. A new disk given a ``key``
    is created encrypted. The epoch is bumped and recorded before any write
    can use it.
    """
    meta = await read_metadata(data)
    if meta is None:
        size = default_size if requested is None else requested
        if key is None:
            layout = Layout(version=FORMAT_CURRENT, page_size=PAGE_SIZE, epoch=1)
            fresh = DeviceMetadata(size, block_size, layout)
            await write_metadata(data, fresh)
            return fresh, None
        disk_id = new_disk_id()
        sealer = Sealer(key, disk_id)
        layout = Layout(version=FORMAT_SEALED, page_size=PAGE_SIZE, epoch=1)
        fresh = DeviceMetadata(size, block_size, layout, Encryption(disk_id, sealer.key_check))
        await write_metadata(data, fresh, sealer)
        return fresh, sealer
    opened_sealer = unlock(meta, key)
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
    opened = replace(meta, size_bytes=size, layout=layout)
    if opened != meta:
        await write_metadata(data, opened, opened_sealer)
    return opened, opened_sealer
