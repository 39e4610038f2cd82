"""The value envelope: how one block or page is stored in SlateDB (format 2).

Every value that format 2 puts into SlateDB starts with a 9-byte header::

    byte 0      codec in the low nibble, flags in the high nibble
    bytes 1..8  sequence number, big-endian (the drain that wrote the value)
    rest        the payload, as the codec says

Why each part is there:

* **codec**: the binding copies every byte it is handed one element at a
  time, so bytes that LZ4 removes in C (which releases the GIL) never cost
  that copy. Incompressible data is stored raw; a hole or an explicitly
  zeroed block is stored as a header alone.
* **sequence**: a whole-block write stores a new base without knowing which
  page deltas of the block exist in the store. A delta counts only when its
  sequence is newer than its base's, so old deltas are shadowed without a
  tombstone each (16 deletes cost more than the put they would accompany).
* **flags**: bit 7 (:data:`FLAG_SEALED`) marks a sealed value, the rest are
  reserved and must be zero. A reader that meets a flag it does not know
  refuses the value instead of misreading it, so a disk written by a newer
  portalbd is never served as garbage or zeros.

A *sealed* value (an encrypted disk, ``store/sealing.py``) keeps the header
in clear and seals everything after it::

    bytes 0..8  header, flag bit 7 set
    then        session salt (16), nonce (12), ciphertext, tag (16)

The ciphertext is of the payload the codec describes: compression comes
first (ciphertext does not compress), and a hole or zero block seals an
empty payload, so its tag still authenticates its header. The header, the
store key and the disk id are the associated data. On an encrypted disk
every value must be sealed and on a plain one none may be: a value of the
other kind is refused.

Pure functions only: no I/O, so the codec can be tested and fuzzed alone.
"""

from __future__ import annotations

import struct

import lz4.block

from portalbd.store.sealing import Sealer, SealError

HEADER = struct.Struct(">BQ")
HEADER_SIZE = HEADER.size

CODEC_RAW = 0  # payload stored as is
CODEC_LZ4 = 1  # payload is an LZ4 block of the value (size known from the key)
CODEC_HOLE = 2  # no payload: unallocated, reads as zeros
CODEC_ZERO = 3  # no payload: allocated, reads as zeros (WRITE_ZEROES with NO_HOLE)
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_LZ4: "lz4", CODEC_HOLE: "hole", CODEC_ZERO: "zero"}

FLAG_MASK = 0xF0
FLAG_SEALED = 0x80  # the payload is sealed (encrypted and authenticated)

# Compression must save at least this share of the value to be kept: a value
# that barely shrinks costs a decompression on every read for little gain.
MIN_SAVING = 8  # i.e. 1/8 = 12.5 %

# Values this large are first probed at both ends: LZ4 on incompressible
# data (most of what a disk holds that is not zeros: media, archives,
# encrypted filesystems) ran at half the cost of the binding's copy itself.
# If neither end compresses, the whole is stored raw untried: at most a
# missed saving, never a wrong value.
PROBE_FROM = 16 * 1024
PROBE = 4096

_ZEROS = bytes(1 << 20)


class EnvelopeError(ValueError):
    """A stored value is not a valid format-2 envelope."""


def is_zero(payload: bytes | memoryview) -> bool:
    """True when every byte is zero (a C-speed comparison, no allocation)."""
    n = len(payload)
    if n <= len(_ZEROS):
        return payload == _ZEROS[:n]
    return bytes(payload).count(0) == n


def encode(
    payload: bytes | memoryview | None,
    seq: int,
    *,
    compress: bool = True,
    seal: Sealer | None = None,
    key: bytes = b"",
) -> bytes:
    """Wrap one value for the store under ``key`` (its store key).

    ``None`` is a hole; a payload of zeros is stored as allocated zeros; the
    rest is compressed when that pays, else stored raw. With ``seal`` the
    result is sealed, bound to ``key``.
    """
    codec, body = _pack(payload, compress)
    if seal is None:
        head = HEADER.pack(codec, seq)
        return head + body if body else head
    return seal.seal(HEADER.pack(codec | FLAG_SEALED, seq), key, body)


def _pack(payload: bytes | memoryview | None, compress: bool) -> tuple[int, bytes | memoryview]:
    """(codec, body) of a payload: what the header announces and what follows it."""
    if payload is None:
        return CODEC_HOLE, b""
    if is_zero(payload):
        return CODEC_ZERO, b""
    if compress and _worth_trying(payload):
        packed: bytes = lz4.block.compress(payload, store_size=False)
        if _saves(len(packed), len(payload)):
            return CODEC_LZ4, packed
    return CODEC_RAW, payload


def _saves(packed: int, size: int) -> bool:
    return packed <= size - size // MIN_SAVING


def _worth_trying(payload: bytes | memoryview) -> bool:
    """Whether compressing the whole may pay: small values, or a compressible end."""
    if len(payload) < PROBE_FROM:
        return True
    view = memoryview(payload)
    return any(
        _saves(len(lz4.block.compress(end, store_size=False)), PROBE)
        for end in (view[:PROBE], view[-PROBE:])
    )


def header(value: bytes, *, sealed: bool = False) -> tuple[int, int]:
    """(codec, sequence) of a stored value, checked; the payload is not read.

    ``sealed``: the disk is encrypted, so the value must be sealed. The
    header is not authenticated here (that takes :func:`decode`).
    """
    if len(value) < HEADER_SIZE:
        raise EnvelopeError(f"stored value of {len(value)} bytes is shorter than its header")
    first, seq = HEADER.unpack_from(value)
    flags = first & FLAG_MASK
    if sealed and flags != FLAG_SEALED:
        raise EnvelopeError(
            f"stored value has envelope flags {flags:#04x} on an encrypted disk, where "
            "every value is sealed (written by something without the key?)"
        )
    if not sealed and flags:
        raise EnvelopeError(
            f"stored value has envelope flags {flags:#04x} that this portalbd "
            "does not know (written by a newer version, or encrypted?)"
        )
    codec = first & 0x0F
    if codec not in CODEC_NAMES:
        raise EnvelopeError(f"stored value has unknown codec {codec}")
    return codec, seq


def decode(
    value: bytes, size: int, *, seal: Sealer | None = None, key: bytes = b""
) -> tuple[int, int, bytes | None]:
    """(codec, sequence, payload) of a stored value of ``size`` bytes.

    The payload is None for a hole and for allocated zeros (the codec tells
    them apart); otherwise exactly ``size`` bytes. With ``seal`` the value is
    authenticated (header included) against ``key`` first.
    """
    codec, seq = header(value, sealed=seal is not None)
    body: bytes | memoryview = memoryview(value)[HEADER_SIZE:]
    if seal is not None:
        try:
            body = seal.unseal(value[:HEADER_SIZE], key, body)
        except SealError as exc:
            raise EnvelopeError(str(exc)) from None
    if codec in (CODEC_HOLE, CODEC_ZERO):
        if len(body):
            raise EnvelopeError(f"a {CODEC_NAMES[codec]} value carries a payload")
        return codec, seq, None
    if codec == CODEC_RAW:
        payload = bytes(body)
    else:
        try:
            payload = lz4.block.decompress(body, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise EnvelopeError(f"corrupt lz4 payload: {exc}") from exc
    if len(payload) != size:
        raise EnvelopeError(f"stored value holds {len(payload)} bytes, expected {size}")
    return codec, seq, payload
