"""On-disk formats: a format-1 disk keeps opening with its data, format 2 is
what new disks get, and what cannot be read is refused with a message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from portalbd.config import LsmConfig
from portalbd.store.instance import InstanceStore
from portalbd.store.location import parse_storage_url
from portalbd.store.metadata import META_KEY
from tests.conftest import DaemonFactory
from tests.support import connected

BS = 65536


def pattern(tag: int, length: int = BS) -> bytes:
    unit = f"[block {tag:08d}]".encode()
    return (unit * (length // len(unit) + 1))[:length]


async def write_raw(url: str, meta: dict[str, object] | None, blocks: dict[int, bytes]) -> None:
    """Lay out a disk by hand, the way an earlier portalbd wrote it."""
    store = await InstanceStore.open(parse_storage_url(url), LsmConfig())
    items: list[tuple[bytes, bytes | None]] = [
        (block.to_bytes(8, "big"), value) for block, value in blocks.items()
    ]
    if meta is not None:
        items.append((META_KEY, json.dumps(meta).encode()))
    await store.data.write(items)
    await store.data.flush()
    await store.close()


async def read_meta(url: str) -> dict[str, object]:
    store = await InstanceStore.open(parse_storage_url(url), LsmConfig())
    raw = await store.data.get(META_KEY)
    await store.close()
    assert raw is not None
    doc: dict[str, object] = json.loads(raw)
    return doc


def test_a_format_1_disk_opens_with_its_data_and_stays_format_1(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/old"
    meta: dict[str, object] = {"format": 1, "size_bytes": 16 * BS, "block_size": BS}
    asyncio.run(write_raw(url, meta, {0: pattern(0), 3: pattern(3), 15: pattern(15)}))
    daemon = daemon_factory("--size-bytes", str(16 * BS), storage_url=url)
    assert "device format=1" in daemon.log()
    with connected(daemon.uri) as nbd:
        assert nbd.pread(BS, 0) == pattern(0)
        assert nbd.pread(BS, BS) == bytes(BS)
        assert nbd.pread(BS, 3 * BS) == pattern(3)
        assert nbd.pread(BS, 15 * BS) == pattern(15)
        nbd.pwrite(b"new" * 1000, 3 * BS + 100)  # a partial write: read-modify-write
        nbd.trim(BS, 0)
        nbd.flush()
    assert daemon.stop() == 0
    assert asyncio.run(read_meta(url))["format"] == 1
    again = daemon_factory("--size-bytes", str(16 * BS), storage_url=url)
    with connected(again.uri) as nbd:
        expected = bytearray(pattern(3))
        expected[100 : 100 + 3000] = b"new" * 1000
        assert nbd.pread(BS, 3 * BS) == bytes(expected)
        assert nbd.pread(BS, 0) == bytes(BS)
        assert nbd.pread(BS, 15 * BS) == pattern(15)


def test_new_disks_are_format_2_and_every_open_bumps_the_epoch(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/new"
    first = daemon_factory(storage_url=url)
    assert first.stop() == 0
    meta = asyncio.run(read_meta(url))
    assert meta["format"] == 2 and meta["page_size"] == 4096
    epoch = meta["epoch"]
    second = daemon_factory(storage_url=url)
    assert second.stop() == 0
    assert asyncio.run(read_meta(url))["epoch"] == epoch + 1  # type: ignore[operator]


def test_a_newer_or_unreadable_format_is_refused(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    newer = f"file://{tmp_path}/newer"
    # format 3 is an encrypted disk (tests/integration/test_encryption.py)
    asyncio.run(write_raw(newer, {"format": 4, "size_bytes": BS, "block_size": BS}, {}))
    daemon = daemon_factory(storage_url=newer, wait=False)
    assert daemon.process.wait(30) == 1
    assert "device format 4 is not supported by portalbd" in daemon.log()
    assert "use the portalbd that created this disk" in daemon.log()
    garbled = f"file://{tmp_path}/garbled"
    asyncio.run(write_raw(garbled, {"size_bytes": BS}, {}))  # no format at all
    daemon = daemon_factory(storage_url=garbled, wait=False, instance="garbled")
    assert daemon.process.wait(30) == 1
    assert "the device metadata is unreadable" in daemon.log()
