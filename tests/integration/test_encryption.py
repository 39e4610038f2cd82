"""Encryption at rest against a real daemon on file storage, through libnbd.

What a client writes must never reach the store directory in clear, the
disk must open only with its own key, and everything a disk does
(restarts, snapshots, restores) must keep working encrypted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from portalbd.trace import format as trace_format
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected
from tests.support.leaks import CHUNK, RUN, leaked_runs

MiB = 1 << 20
BLOCK = 64 * 1024
SIZE = 8 * MiB


def allocation(uri: str, length: int) -> dict[int, int]:
    """Block status flags of every block in [0, length): sealed blocks are
    classified from their clear headers (3 is a hole, reading as zeros)."""
    import nbd

    handle = nbd.NBD()
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    flags_at: dict[int, int] = {}

    def extents(_ctx: str, offset: int, entries: list[int], _err: object) -> int:
        for i in range(0, len(entries), 2):
            for block in range(offset // BLOCK, (offset + entries[i]) // BLOCK):
                flags_at[block] = entries[i + 1]
            offset += entries[i]
        return 0

    handle.block_status(length, 0, extents)
    handle.shutdown()
    return flags_at


def write_key(path: Path, key: bytes, *, hex_form: bool = True) -> Path:
    path.write_bytes(key.hex().encode() + b"\n" if hex_form else key)
    return path


def refused(factory: DaemonFactory, storage: Path, instance: str, *args: str) -> str:
    """Start a daemon that must refuse to start; its log."""
    daemon = factory(
        f"--size-bytes={SIZE}",
        *args,
        storage_url=f"file://{storage}",
        wait=False,
        instance=instance,
    )
    assert daemon.process.wait(30) == 1
    return daemon.log()


def encrypted(factory: DaemonFactory, storage: Path, key_file: Path) -> RunningDaemon:
    return factory(
        f"--size-bytes={SIZE}", f"--encryption-key-file={key_file}", storage_url=f"file://{storage}"
    )


def test_detector_finds_a_run_at_any_offset(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(4 * BLOCK)
    (tmp_path / "f").write_bytes(os.urandom(1001) + data[5000 + 13 : 5000 + 13 + RUN] + b"x")
    assert leaked_runs(data, tmp_path) == ["f@1012"]  # the aligned chunk data[5024:5056]
    (tmp_path / "f").write_bytes(os.urandom(1001) + data[5000 + 13 : 5000 + 13 + CHUNK - 1])
    assert leaked_runs(data, tmp_path) == []


def test_an_encrypted_disk_stores_no_plaintext_and_opens_only_with_its_key(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "data"
    key_file = write_key(tmp_path / "disk.key", os.urandom(32))
    rng = random.Random(16)
    blocks = rng.randbytes(32 * BLOCK)  # whole blocks: stored as bases
    pages = rng.randbytes(8 * 4096)  # 4 KiB writes into unread blocks: page deltas
    daemon = encrypted(daemon_factory, storage, key_file)
    assert "encrypted=aes-256-gcm" in daemon.log()
    assert daemon.status()["encryption"] == "aes-256-gcm"
    with connected(daemon.uri) as nbd:
        nbd.pwrite(blocks, 0)
        for i in range(8):
            nbd.pwrite(pages[i * 4096 : (i + 1) * 4096], 40 * BLOCK + i * 2 * 4096)
        nbd.trim(BLOCK, 4 * BLOCK)
        nbd.flush()
    assert daemon.stop() == 0
    assert leaked_runs(blocks + pages, storage) == []

    wrong = write_key(tmp_path / "wrong.key", os.urandom(32), hex_form=False)
    log = refused(daemon_factory, storage, "wrong", f"--encryption-key-file={wrong}")
    assert "the encryption key does not match this disk" in log
    log = refused(daemon_factory, storage, "missing")
    assert "this disk is encrypted; give its key with --encryption-key-file" in log
    short = tmp_path / "short.key"
    short.write_bytes(b"abc\n")
    log = refused(daemon_factory, storage, "short", f"--encryption-key-file={short}")
    assert f"encryption key file {short}: it holds 4 bytes" in log

    again = encrypted(daemon_factory, storage, key_file)
    with connected(again.uri) as nbd:
        expected = bytearray(blocks)
        expected[4 * BLOCK : 5 * BLOCK] = bytes(BLOCK)
        assert nbd.pread(len(blocks), 0) == bytes(expected)
        for i in range(8):
            got = nbd.pread(4096, 40 * BLOCK + i * 2 * 4096)
            assert got == pages[i * 4096 : (i + 1) * 4096]
        assert nbd.pread(4096, 40 * BLOCK + 4096) == bytes(4096)
    assert allocation(again.uri, 8 * BLOCK) == {0: 0, 1: 0, 2: 0, 3: 0, 4: 3, 5: 0, 6: 0, 7: 0}
    assert again.stop() == 0


def test_a_key_is_refused_for_a_plain_disk(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    storage = tmp_path / "plain"
    plain = daemon_factory(f"--size-bytes={SIZE}", storage_url=f"file://{storage}")
    assert plain.status()["encryption"] is None
    assert plain.stop() == 0
    key_file = write_key(tmp_path / "disk.key", os.urandom(32))
    log = refused(daemon_factory, storage, "keyed", f"--encryption-key-file={key_file}")
    assert "this disk is not encrypted (device format 2) but an encryption key was given" in log


def test_snapshot_and_restore_of_an_encrypted_disk(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "data"
    key_file = write_key(tmp_path / "disk.key", os.urandom(32))
    first = random.Random(1).randbytes(4 * BLOCK)
    second = random.Random(2).randbytes(4 * BLOCK)
    daemon = encrypted(daemon_factory, storage, key_file)
    with connected(daemon.uri) as nbd:
        nbd.pwrite(first, 0)
        nbd.flush()
    assert daemon.control({"SnapshotCreate": {"name": "s1"}})["Snapshot"]["name"] == "s1"
    with connected(daemon.uri) as nbd:
        nbd.pwrite(second, 0)
        nbd.flush()
    assert daemon.control({"SnapshotRestore": {"name": "s1", "force": True}}) == "Ok"
    with connected(daemon.uri) as nbd:
        assert nbd.pread(len(first), 0) == first
        nbd.pwrite(second[:4096], 8 * BLOCK)  # writes after the restore seal with the disk's key
        nbd.flush()
    assert daemon.stop() == 0
    conf = tmp_path / "disk.toml"  # the key file from TOML this time
    conf.write_text(f'[storage]\nencryption_key_file = "{key_file}"\n')
    trace = tmp_path / "reads.trace"  # a trace records requests, never their data
    again = daemon_factory(
        f"--size-bytes={SIZE}", "-c", str(conf), f"--trace={trace}", storage_url=f"file://{storage}"
    )
    with connected(again.uri) as nbd:
        assert nbd.pread(len(first), 0) == first
        assert nbd.pread(4096, 8 * BLOCK) == second[:4096]
    assert again.stop() == 0
    assert leaked_runs(first + second, storage) == []
    _, ops = trace_format.load(trace)
    assert [(op.offset, op.length) for op in ops if op.type == trace_format.OpType.Read][-2:] == [
        (0, len(first)),
        (8 * BLOCK, 4096),
    ]


def test_a_key_file_others_can_read_gets_a_warning(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    key_file = write_key(tmp_path / "open.key", os.urandom(32))
    key_file.chmod(0o644)
    daemon = encrypted(daemon_factory, tmp_path / "data", key_file)
    assert (
        f"encryption key file {key_file} is readable by other users (mode 644): chmod o-r it"
        in daemon.log()
    )
    assert daemon.stop() == 0
    key_file.chmod(0o600)
    again = encrypted(daemon_factory, tmp_path / "data", key_file)
    assert "readable by other users" not in again.log()
