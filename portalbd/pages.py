"""Page-granular block contents: the pure half of format 2.

A block (64 KiB by default) is split into pages (4 KiB). The store holds,
for each block, an optional *base* value (the whole block) under the block's
8-byte key and optional *page deltas* under that key plus a 2-byte page
number, which sort right after the base. One range scan over the block's
keys therefore returns everything needed to rebuild it.

Why: a 4 KiB write into a block the daemon has not read would otherwise cost
a 64 KiB read and a 64 KiB write through the binding (32x the client's
bytes). With deltas it costs one 4 KiB put, and no read at all.

In memory a block whose base is unknown is a :class:`Pages`: a buffer per
page written plus a bitmask of them. Reads of written pages are
answered from it; anything else needs the stored block under it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from portalbd.store.envelope import CODEC_HOLE, CODEC_ZERO, decode, header
from portalbd.store.items import Tombstone
from portalbd.store.sealing import Sealer

_BASE = struct.Struct(">Q")
_DELTA = struct.Struct(">QH")
BASE_KEY_SIZE = _BASE.size
DELTA_KEY_SIZE = _DELTA.size

# What a drain puts under a key: a block or page (a view into a buffer is
# fine), None for a hole, or DELETE to remove the key.
Payload = bytes | memoryview | Tombstone | None


@dataclass(frozen=True, slots=True)
class Layout:
    """How blocks are laid out in the store; recorded in the device metadata.

    Format 1 (portalbd up to 0.1): one raw value per block, a hole is an
    absent key. Format 2: enveloped values (``store/envelope.py``), page
    deltas, holes as header-only values. Format 3: format 2 with every value
    sealed (an encrypted disk).
    """

    version: int = 2
    page_size: int = 4096
    epoch: int = 1  # bumped at every open, so sequence numbers only grow
    compress: bool = True

    @property
    def deltas(self) -> bool:
        return self.version >= 2

    @property
    def sealed(self) -> bool:
        return self.version == 3


def base_key(block: int) -> bytes:
    return _BASE.pack(block)


def delta_key(block: int, page: int) -> bytes:
    return _DELTA.pack(block, page)


def key_block(key: bytes) -> int:
    """The block a base or delta key belongs to."""
    value: int = _BASE.unpack_from(key)[0]
    return value


def page_span(start: int, end: int, page_size: int) -> tuple[int, int]:
    """First and one-past-last page that the bytes [start, end) touch."""
    return start // page_size, -(-end // page_size)


def page_mask(start: int, end: int, page_size: int) -> int:
    first, stop = page_span(start, end, page_size)
    return ((1 << (stop - first)) - 1) << first


def aligned(start: int, end: int, page_size: int) -> bool:
    return start % page_size == 0 and end % page_size == 0


class Pages:
    """Some pages of a block whose other pages are not known here.

    Held sparsely, a buffer per page written: random 4 KiB writes leave
    thousands of blocks with a page or two each, and a block-sized buffer
    apiece made each of them cost (and zero) 64 KiB, so the write-back
    budget filled with 16x the bytes written and writers waited on drains
    they did not need.
    """

    __slots__ = ("_held", "block_size", "mask", "page_size")

    def __init__(self, block_size: int, page_size: int) -> None:
        self._held: dict[int, bytearray] = {}
        self.mask = 0
        self.block_size = block_size
        self.page_size = page_size

    @property
    def full(self) -> bool:
        return len(self._held) == self.block_size // self.page_size

    @property
    def held_bytes(self) -> int:
        """What the held pages take in memory (the write-back budget's measure)."""
        return len(self._held) * self.page_size

    def covers(self, start: int, end: int) -> bool:
        """Every page that [start, end) touches is held here."""
        wanted = page_mask(start, end, self.page_size)
        return self.mask & wanted == wanted

    def has_page(self, page: int) -> bool:
        return bool(self.mask >> page & 1)

    def page(self, page: int) -> bytearray:
        """The buffer of a held page."""
        return self._held[page]

    def put(self, start: int, end: int, data: bytes | memoryview | None) -> None:
        """Write [start, end) of the block; ``None`` data means zeros.

        The range must be page-aligned or inside pages already held, so no
        page ever mixes known and unknown bytes.
        """
        ps = self.page_size
        if not (aligned(start, end, ps) or self.covers(start, end)):
            raise ValueError("a partial page write needs the page's old contents")
        first, stop = page_span(start, end, ps)
        for page in range(first, stop):
            lo, hi = max(start, page * ps), min(end, (page + 1) * ps)
            held = self._held.get(page)
            if held is None:  # not held, so the write is aligned: all of the page
                self._held[page] = (
                    bytearray(ps) if data is None else bytearray(data[lo - start : hi - start])
                )
                continue
            if data is None:
                held[lo - page * ps : hi - page * ps] = bytes(hi - lo)
            else:
                held[lo - page * ps : hi - page * ps] = data[lo - start : hi - start]
        self.mask |= page_mask(start, end, ps)

    def pages(self) -> Iterator[int]:
        return mask_pages(self.mask)

    def overlay(self, target: bytearray) -> None:
        """Copy the held pages over ``target`` (a whole block)."""
        ps = self.page_size
        for page, held in self._held.items():
            target[page * ps : (page + 1) * ps] = held

    def block(self) -> bytearray:
        """The whole block, zeros where no page is held (for a full one: its contents)."""
        out = bytearray(self.block_size)
        self.overlay(out)
        return out

    def under(self, newer: Pages) -> Pages:
        """These pages with ``newer`` written over them, as a new Pages."""
        merged = Pages(self.block_size, self.page_size)
        merged._held = {page: bytearray(held) for page, held in self._held.items()}
        for page, held in newer._held.items():
            merged._held[page] = bytearray(held)
        merged.mask = self.mask | newer.mask
        return merged


def compose(base: bytes | bytearray, layers: Sequence[Pages], block_size: int) -> bytearray:
    """A whole block: ``base`` (empty means zeros) under ``layers``, oldest first."""
    out = bytearray(base) if base else bytearray(block_size)
    for layer in layers:
        layer.overlay(out)
    return out


def merge_stored(
    entries: Iterable[tuple[bytes, bytes]],
    block_size: int,
    page_size: int,
    seal: Sealer | None = None,
) -> tuple[bytes, int]:
    """Rebuild one block from its stored base and deltas (keys in order).

    Returns the block (``b""`` for a hole) and its status flags: 0 for data,
    else :data:`CODEC_HOLE` or :data:`CODEC_ZERO` when the block is wholly a
    hole or allocated zeros. A delta only counts when it is newer than the
    base; older ones were shadowed by a whole-block write.
    """
    base_seq = -1
    base: bytes | None = None
    base_codec = CODEC_HOLE
    out: bytearray | None = None
    for key, value in entries:
        if len(key) == BASE_KEY_SIZE:
            base_codec, base_seq, base = decode(value, block_size, seal=seal, key=key)
            continue
        if len(key) != DELTA_KEY_SIZE:
            raise ValueError(f"unexpected key of {len(key)} bytes in the block key space")
        _, seq, payload = decode(value, page_size, seal=seal, key=key)
        if seq <= base_seq:
            continue
        if out is None:
            out = bytearray(base) if base is not None else bytearray(block_size)
        page = _DELTA.unpack(key)[1]
        if payload is None:
            out[page * page_size : (page + 1) * page_size] = bytes(page_size)
        else:
            out[page * page_size : (page + 1) * page_size] = payload
    if out is not None:
        return bytes(out), 0
    if base is None:
        if base_codec == CODEC_ZERO:
            return bytes(block_size), CODEC_ZERO
        return b"", CODEC_HOLE
    return base, 0


def stored_flags(entries: Sequence[tuple[bytes, bytes]], *, sealed: bool = False) -> int:
    """Status of one block from its stored entries, reading headers only.

    0 (data) unless the newest state is a hole or allocated zeros with no
    newer delta over it. On an encrypted disk (``sealed``) the headers are
    in clear, so this needs no key: it trusts them unauthenticated, which can
    only mislead an allocation map; every read authenticates.
    """
    base_seq, base_codec = -1, CODEC_HOLE
    newest_delta = -1
    for key, value in entries:
        codec, seq = header(value, sealed=sealed)
        if len(key) == BASE_KEY_SIZE:
            base_seq, base_codec = seq, codec
        else:
            newest_delta = max(newest_delta, seq)
    if newest_delta > base_seq:
        return 0
    if base_seq < 0:
        return CODEC_HOLE
    return base_codec if base_codec in (CODEC_HOLE, CODEC_ZERO) else 0


def mask_pages(mask: int) -> Iterator[int]:
    """The page numbers whose bits are set in ``mask``, lowest first."""
    page = 0
    while mask:
        if mask & 1:
            yield page
        mask >>= 1
        page += 1


def delta_pages(entries: Iterable[tuple[bytes, bytes]]) -> int:
    """Bitmask of the pages that have a delta key among one block's entries.

    Shadowed deltas count too: they are keys a scan still returns.
    """
    mask = 0
    for key, _ in entries:
        if len(key) == DELTA_KEY_SIZE:
            mask |= 1 << _DELTA.unpack(key)[1]
    return mask


def group_by_block(
    entries: Iterable[tuple[bytes, bytes]],
) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
    """Consecutive scan entries grouped per block, in block order."""
    block = -1
    group: list[tuple[bytes, bytes]] = []
    for key, value in entries:
        b = key_block(key)
        if b != block and group:
            yield block, group
            group = []
        block = b
        group.append((key, value))
    if group:
        yield block, group


def split_batches(
    items: Sequence[tuple[bytes, Payload]], batch_bytes: int
) -> list[list[tuple[bytes, Payload]]]:
    """Split a drain's (key, value) items, in key order, into write batches.

    Each batch holds about ``batch_bytes``, and a block's keys (its base or
    its page deltas) never straddle two: a batch is atomic, and a crash
    between two batches must not leave one write torn across them.
    """
    batches: list[list[tuple[bytes, Payload]]] = []
    current: list[tuple[bytes, Payload]] = []
    size = 0
    for key, value in items:
        if size >= batch_bytes and key[:BASE_KEY_SIZE] != current[-1][0][:BASE_KEY_SIZE]:
            batches.append(current)
            current, size = [], 0
        current.append((key, value))
        size += (len(value) if isinstance(value, bytes | memoryview) else 0) + 64
    if current:
        batches.append(current)
    return batches
