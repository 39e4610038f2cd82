"""Sealed values (encryption at rest): round trips, and every kind of tampering refused.

The envelope seals with the disk's :class:`Sealer`; these tests hold it to
its promises against random payloads: the plaintext never shows, a flipped
bit anywhere, a value moved to another key or another disk, a replayed
header and another key all fail authentication, and nonces do not repeat.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalbd.pages import Layout, base_key, delta_key, merge_stored, stored_flags
from portalbd.store import envelope
from portalbd.store.keyfile import KeyFileError, parse_key, read_key_file
from portalbd.store.metadata import (
    DeviceMetadata,
    Encryption,
    MetadataError,
    unlock,
)
from portalbd.store.sealing import OVERHEAD, SALT_SIZE, Sealer, key_check

PS = 4096
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DISK = b"disk-id-16-bytes"
OTHER_DISK = b"another-disk-id!"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

payloads = st.one_of(
    st.none(),
    st.binary(min_size=PS, max_size=PS),
    st.sampled_from([bytes(PS), b"text " * (PS // 5) + b"t"]),
)
store_keys = st.one_of(
    st.integers(0, 2**40).map(base_key),
    st.tuples(st.integers(0, 2**40), st.integers(0, 15)).map(lambda bp: delta_key(*bp)),
)
SEALER = Sealer(KEY, DISK)


@FUZZ
@given(payloads, st.integers(0, 2**63 - 1), store_keys, st.booleans())
def test_a_sealed_value_round_trips_and_hides_its_payload(
    payload: bytes | None, seq: int, key: bytes, compress: bool
) -> None:
    stored = envelope.encode(payload, seq, compress=compress, seal=SEALER, key=key)
    codec, got_seq, got = envelope.decode(stored, PS, seal=SEALER, key=key)
    assert got_seq == seq
    assert got == (None if payload is None or payload == bytes(PS) else payload)
    assert envelope.header(stored, sealed=True) == (codec, seq)
    assert stored[0] & envelope.FLAG_SEALED
    if payload is not None and payload != bytes(PS):
        assert payload[:64] not in stored
    # a hole or zero block is sealed too: its tag authenticates header and key
    assert len(stored) >= envelope.HEADER_SIZE + OVERHEAD


@FUZZ
@given(payloads, st.integers(0, 2**63 - 1), store_keys, st.data())
def test_any_flipped_bit_fails_authentication(
    payload: bytes | None, seq: int, key: bytes, data: st.DataObject
) -> None:
    stored = bytearray(envelope.encode(payload, seq, seal=SEALER, key=key))
    position = data.draw(st.integers(0, len(stored) - 1))
    stored[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode(bytes(stored), PS, seal=SEALER, key=key)


@FUZZ
@given(payloads, st.integers(0, 2**63 - 1), store_keys, store_keys)
def test_a_value_moved_to_another_key_fails(
    payload: bytes | None, seq: int, key: bytes, other: bytes
) -> None:
    stored = envelope.encode(payload, seq, seal=SEALER, key=key)
    if other != key:
        with pytest.raises(envelope.EnvelopeError, match="fails authentication"):
            envelope.decode(stored, PS, seal=SEALER, key=other)


@FUZZ
@given(payloads, st.integers(0, 2**62), store_keys)
def test_another_disk_another_key_or_a_replayed_header_fail(
    payload: bytes | None, seq: int, key: bytes
) -> None:
    stored = envelope.encode(payload, seq, seal=SEALER, key=key)
    for reader in (Sealer(KEY, OTHER_DISK), Sealer(OTHER_KEY, DISK)):
        with pytest.raises(envelope.EnvelopeError, match="fails authentication"):
            envelope.decode(stored, PS, seal=reader, key=key)
    # an older value's header on a newer body (or the reverse): a replayed header
    newer = envelope.encode(payload, seq + 1, seal=SEALER, key=key)
    spliced = newer[: envelope.HEADER_SIZE] + stored[envelope.HEADER_SIZE :]
    with pytest.raises(envelope.EnvelopeError, match="fails authentication"):
        envelope.decode(spliced, PS, seal=SEALER, key=key)


@FUZZ
@given(st.binary(max_size=200))
def test_garbage_is_refused_never_crashes(value: bytes) -> None:
    for seal in (SEALER, None):
        with contextlib.suppress(envelope.EnvelopeError):
            envelope.decode(value, PS, seal=seal, key=base_key(1))


def test_plain_and_sealed_values_never_pass_for_each_other() -> None:
    plain = envelope.encode(b"x" * PS, 5, key=base_key(1))
    with pytest.raises(envelope.EnvelopeError, match="on an encrypted disk, where every value"):
        envelope.decode(plain, PS, seal=SEALER, key=base_key(1))
    sealed = envelope.encode(b"x" * PS, 5, seal=SEALER, key=base_key(1))
    with pytest.raises(envelope.EnvelopeError, match="envelope flags 0x80"):
        envelope.decode(sealed, PS)
    hole = envelope.encode(None, 5, seal=SEALER, key=base_key(1))
    with pytest.raises(envelope.EnvelopeError, match="on an encrypted disk"):
        envelope.header(bytes([hole[0] & 0x0F]) + hole[1:], sealed=True)  # flag cleared


def test_nonces_never_repeat_within_a_session_key_and_sessions_rotate() -> None:
    salts = itertools.count()
    sealer = Sealer(
        KEY, DISK, random_bytes=lambda n: next(salts).to_bytes(n, "big"), session_values=3
    )
    seen = set()
    for i in range(10):
        stored = sealer.seal(b"h", b"k", b"body")
        salt_and_nonce = stored[1 : 1 + SALT_SIZE + 12]
        assert salt_and_nonce not in seen
        seen.add(salt_and_nonce)
        assert int.from_bytes(stored[1 : 1 + SALT_SIZE], "big") == i // 3  # a new session each 3
        assert sealer.unseal(b"h", b"k", stored[1:]) == b"body"


def test_merge_and_block_status_read_sealed_blocks() -> None:
    block_size = 4 * PS
    base = bytes([7]) * block_size
    entries = [
        (base_key(3), envelope.encode(base, 10, seal=SEALER, key=base_key(3))),
        (delta_key(3, 1), envelope.encode(b"d" * PS, 11, seal=SEALER, key=delta_key(3, 1))),
    ]
    value, _ = merge_stored(entries, block_size, PS, SEALER)
    assert value == base[:PS] + b"d" * PS + base[2 * PS :]
    assert stored_flags(entries, sealed=True) == 0
    hole = [(base_key(3), envelope.encode(None, 12, seal=SEALER, key=base_key(3)))]
    assert stored_flags(hole, sealed=True) == envelope.CODEC_HOLE
    swapped = [(base_key(4), entries[0][1])]  # block 3's base stored as block 4's
    with pytest.raises(ValueError, match="fails authentication"):
        merge_stored(swapped, block_size, PS, SEALER)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" * 31, "it holds 31 bytes"),
        (b"\x00" * 33, "it holds 33 bytes"),
        (b"", "it holds 0 bytes"),
        (b"g" * 64, "not all hex digits"),
        (b"ab" * 31 + b"\n", "it holds 63 bytes"),
    ],
)
def test_a_key_file_that_is_not_a_key_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(KeyFileError, match=message) as caught:
        parse_key(data)
    assert "openssl rand -hex 32" in str(caught.value)


def test_a_key_file_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read it: No such file or directory"):
        read_key_file(tmp_path / "nope")
    (tmp_path / "k").write_bytes(KEY)
    assert read_key_file(tmp_path / "k") == KEY


def test_key_files_take_raw_bytes_or_hex() -> None:
    assert parse_key(KEY) == KEY
    assert parse_key(KEY.hex().encode()) == KEY
    assert parse_key(KEY.hex().upper().encode() + b"\n") == KEY
    assert parse_key(KEY.hex().encode() + b"\r\n") == KEY


def _sealed_meta(epoch: int = 4) -> tuple[DeviceMetadata, bytes]:
    meta = DeviceMetadata(
        1 << 20, 65536, Layout(version=3, epoch=epoch), Encryption(DISK, key_check(KEY, DISK))
    )
    return meta, meta.encode(SEALER)


def test_the_metadata_accepts_only_its_key_and_only_unaltered() -> None:
    meta, raw = _sealed_meta()
    decoded = DeviceMetadata.decode(raw)
    assert decoded == meta
    sealer = unlock(decoded, KEY)
    assert sealer is not None and sealer.disk_id == DISK
    with pytest.raises(MetadataError, match="does not match this disk"):
        unlock(decoded, OTHER_KEY)
    with pytest.raises(MetadataError, match="this disk is encrypted; give its key"):
        unlock(decoded, None)
    doc = json.loads(raw)
    doc["epoch"] = 1  # rolled back: sequence numbers would repeat
    with pytest.raises(MetadataError, match="fails authentication"):
        unlock(DeviceMetadata.decode(json.dumps(doc).encode()), KEY)
    plain = DeviceMetadata.decode(DeviceMetadata(1 << 20, 65536, Layout()).encode())
    with pytest.raises(MetadataError, match="this disk is not encrypted"):
        unlock(plain, KEY)
    assert unlock(plain, None) is None


def test_an_encrypted_disk_s_metadata_that_cannot_be_read_is_refused() -> None:
    _, raw = _sealed_meta()
    doc = json.loads(raw)
    del doc["encryption"]
    with pytest.raises(MetadataError, match="device metadata \\(format 3\\) is unreadable"):
        DeviceMetadata.decode(json.dumps(doc).encode())
    doc = json.loads(raw)
    doc["encryption"]["disk_id"] = "abcd"
    with pytest.raises(MetadataError, match="unreadable \\(a disk id of 2 bytes\\)"):
        DeviceMetadata.decode(json.dumps(doc).encode())
    doc = json.loads(raw)
    doc["encryption"]["cipher"] = "rot13"
    with pytest.raises(MetadataError, match="encrypted with 'rot13', which portalbd"):
        DeviceMetadata.decode(json.dumps(doc).encode())
    plain = DeviceMetadata(1 << 20, 65536, Layout())
    assert b"encryption" not in plain.encode() and b"mac" not in plain.encode()
