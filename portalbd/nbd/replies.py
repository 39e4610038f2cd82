"""The client's side of the transmission phase: replies in, events out, no I/O.

:class:`ReplyDecoder` parses the simple and structured replies a server
sends, checking each against the request it answers (a READ's simple reply
carries as many bytes as were asked for, data chunks only answer READs,
block status only BLOCK_STATUS). Whatever breaks the spec raises
:class:`ProtocolError`, so a test or the simulation sees a server's mistake
as such.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from portalbd.nbd.transmission import NEED_DATA, NeedData, encode_request
from portalbd.nbd.wire import (
    EXTENT,
    MAX_PAYLOAD,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U64,
    Cmd,
    ProtocolError,
)

# The largest structured chunk accepted: a full READ's data and its offset,
# or a block status reply of many extents.
MAX_CHUNK = MAX_PAYLOAD + 64 * 1024
_ERROR_HEAD = struct.Struct(">IH")  # error, message length
_HOLE = struct.Struct(">QI")  # offset, length
_ERROR_BIT = 1 << 15


@dataclass(frozen=True, slots=True, kw_only=True)
class SimpleReply:
    """A simple reply; ``data`` is a successful READ's."""

    handle: int
    error: int
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyChunk:
    """One structured reply chunk; ``done`` when it is the request's last.

    Which fields mean something depends on ``kind``: ``offset`` and
    ``data`` for OFFSET_DATA, ``offset`` and ``hole`` for OFFSET_HOLE,
    ``context_id`` and ``extents`` (length, flags) for BLOCK_STATUS,
    ``error``, ``message`` (and ``offset`` for ERROR_OFFSET) for errors.
    """

    handle: int
    kind: int
    done: bool
    offset: int = 0
    data: bytes = b""
    hole: int = 0
    context_id: int = 0
    extents: tuple[tuple[int, int], ...] = ()
    error: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class _Sent:
    command: int
    offset: int
    length: int


@dataclass(slots=True)
class ReplyDecoder:
    """Client side of the transmission phase.

    Each request is announced with :meth:`expect` (or built by
    :meth:`request`, which does both): a reply says neither what it answers
    nor how long a simple READ reply's data is. Then feed received bytes to
    :meth:`receive_data` and call :meth:`next_event` until
    :data:`NEED_DATA`.
    """

    _buffer: bytearray = field(default_factory=bytearray)
    _pending: dict[int, _Sent] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        """Requests whose reply has not finished yet."""
        return len(self._pending)

    def expect(self, handle: int, command: int, offset: int, length: int) -> None:
        if handle in self._pending:
            raise ValueError(f"handle {handle} is already in flight")
        self._pending[handle] = _Sent(command, offset, length)

    def request(
        self,
        command: int,
        handle: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes = b"",
    ) -> bytes:
        """A request's bytes (header and WRITE payload); its reply is expected."""
        self.expect(handle, command, offset, length)
        return encode_request(command, handle, offset, length, flags) + payload

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> SimpleReply | ReplyChunk | NeedData:
        buf = self._buffer
        if len(buf) < 4:
            return NEED_DATA
        (magic,) = U32.unpack_from(buf)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._structured()
        raise ProtocolError(f"bad reply magic {magic:#x}")

    def _sent(self, handle: int) -> _Sent:
        sent = self._pending.get(handle)
        if sent is None:
            raise ProtocolError(f"reply for unknown handle {handle}")
        return sent

    def _simple(self) -> SimpleReply | NeedData:
        buf = self._buffer
        if len(buf) < SIMPLE_REPLY.size:
            return NEED_DATA
        _magic, error, handle = SIMPLE_REPLY.unpack_from(buf)
        sent = self._sent(handle)
        size = SIMPLE_REPLY.size
        if sent.command == Cmd.READ and error == 0:
            size += sent.length
        if len(buf) < size:
            return NEED_DATA
        data = bytes(buf[SIMPLE_REPLY.size : size])
        del buf[:size]
        del self._pending[handle]
        return SimpleReply(handle=handle, error=error, data=data)

    def _structured(self) -> ReplyChunk | NeedData:
        buf = self._buffer
        if len(buf) < STRUCTURED_HEADER.size:
            return NEED_DATA
        _magic, flags, kind, handle, length = STRUCTURED_HEADER.unpack_from(buf)
        sent = self._sent(handle)
        if length > MAX_CHUNK:
            raise ProtocolError(f"structured chunk of {length} bytes")
        if len(buf) < STRUCTURED_HEADER.size + length:
            return NEED_DATA
        body = bytes(buf[STRUCTURED_HEADER.size : STRUCTURED_HEADER.size + length])
        del buf[: STRUCTURED_HEADER.size + length]
        done = bool(flags & REPLY_FLAG_DONE)
        chunk = _chunk(handle, kind, done, body, sent)
        if done:
            del self._pending[handle]
        return chunk


def _chunk(handle: int, kind: int, done: bool, body: bytes, sent: _Sent) -> ReplyChunk:
    """Parse and check one chunk's body."""
    if kind == REPLY_TYPE_NONE:
        if body or not done:
            raise ProtocolError("a NONE chunk must be empty and final")
        return ReplyChunk(handle=handle, kind=kind, done=done)
    if kind in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
        if sent.command != Cmd.READ:
            raise ProtocolError(f"chunk type {kind} answers command {sent.command}")
        if kind == REPLY_TYPE_OFFSET_DATA:
            if len(body) <= U64.size:
                raise ProtocolError("OFFSET_DATA chunk without data")
            (offset,) = U64.unpack_from(body)
            size = len(body) - U64.size
            data = body[U64.size :]
        else:
            if len(body) != _HOLE.size:
                raise ProtocolError(f"OFFSET_HOLE chunk of {len(body)} bytes")
            offset, size = _HOLE.unpack(body)
            data = b""
        if offset < sent.offset or offset + size > sent.offset + sent.length or not size:
            raise ProtocolError(f"chunk {offset}+{size} outside the request")
        return ReplyChunk(handle=handle, kind=kind, done=done, offset=offset, data=data, hole=size)
    if kind == REPLY_TYPE_BLOCK_STATUS:
        if sent.command != Cmd.BLOCK_STATUS:
            raise ProtocolError(f"block status answers command {sent.command}")
        if len(body) < U32.size + EXTENT.size or (len(body) - U32.size) % EXTENT.size:
            raise ProtocolError(f"block status chunk of {len(body)} bytes")
        (context_id,) = U32.unpack_from(body)
        extents = tuple(EXTENT.iter_unpack(body[U32.size :]))
        return ReplyChunk(
            handle=handle, kind=kind, done=done, context_id=context_id, extents=extents
        )
    if kind & _ERROR_BIT:
        return _error_chunk(handle, kind, done, body)
    raise ProtocolError(f"unknown chunk type {kind}")


def _error_chunk(handle: int, kind: int, done: bool, body: bytes) -> ReplyChunk:
    if len(body) < _ERROR_HEAD.size:
        raise ProtocolError(f"error chunk of {len(body)} bytes")
    error, size = _ERROR_HEAD.unpack_from(body)
    end = _ERROR_HEAD.size + size
    extra = U64.size if kind == REPLY_TYPE_ERROR_OFFSET else 0
    if error == 0:
        raise ProtocolError("error chunk with error 0")
    if kind in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET) and len(body) != end + extra:
        raise ProtocolError(f"error chunk of {len(body)} bytes, message of {size}")
    if len(body) < end:
        raise ProtocolError(f"error message of {size} bytes in {len(body)}")
    message = body[_ERROR_HEAD.size : end].decode("utf-8", "replace")
    offset = U64.unpack_from(body, end)[0] if extra else 0
    return ReplyChunk(
        handle=handle, kind=kind, done=done, error=error, message=message, offset=offset
    )
