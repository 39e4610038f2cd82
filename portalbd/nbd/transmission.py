"""The transmission phase, both roles, with no I/O.

Server role: :class:`RequestDecoder` cuts the received byte stream into
requests, checks each against the export (:func:`check_request`) and hands
WRITE payloads out as views into the bytes received, so a 4 KiB write that
arrived whole is never copied here. The reply encoders build what the server
sends back.

Client role: :func:`encode_request` builds requests and :class:`ReplyDecoder`
parses simple and structured replies (data, holes, block status, errors).

The server, the simulation's client, the fuzzers and the tests all use these,
so what is fuzzed is what serves.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from portalbd.nbd.wire import (
    ALLOWED_FLAGS,
    EXTENT,
    MAX_PAYLOAD,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REQUEST_HEADER,
    REQUEST_HEADER_SIZE,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_CACHE,
    TF_SEND_DF,
    TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    U32,
    U64,
    Cmd,
    Err,
    ProtocolError,
)


class NeedData(enum.Enum):
    """What ``next_event`` returns when the bytes received are used up."""

    NEED_DATA = "need-data"


NEED_DATA: Final = NeedData.NEED_DATA

# Commands that change the disk: refused with EPERM on a read-only export.
_CHANGES = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
_WRITE: Final = int(Cmd.WRITE)
_unpack_header = REQUEST_HEADER.unpack_from


# --- requests ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Request:
    """One request, as decoded (or to be encoded).

    ``error`` is what :func:`check_request` said (0: serve it); ``payload``
    is a WRITE's data once received (None for other commands, and for a
    WRITE refused by the check, whose payload is skipped unread).
    """

    flags: int
    command: int
    handle: int
    offset: int
    length: int
    error: int = 0
    payload: memoryview | None = None


@dataclass(slots=True)
class PayloadAhead:
    """A WRITE's header arrived and its payload follows.

    The payload is gathered only on the next call to ``next_event``, so a
    caller that bounds memory holds ``request.length`` bytes for it first
    (unless ``request.error`` says it will be skipped), then goes on; the
    complete :class:`Request` comes after the payload.
    """

    request: Request


def check_request(request: Request, export_size: int, *, read_only: bool = False) -> int:
    """Validate a request against the export; return an NBD error or 0.

    Pure so that the rules (and their edge cases) are tested without a
    server. The read-only rule comes last: a request that is wrong anyway
    gets the error that says how.
    """
    command = request.command
    allowed = ALLOWED_FLAGS.get(command)
    if allowed is None:
        return Err.EINVAL
    if request.flags & ~allowed:
        return Err.EINVAL
    if command in (Cmd.FLUSH, Cmd.DISC):
        return Err.OK
    end = request.offset + request.length
    if command in (Cmd.READ, Cmd.WRITE) and request.length > MAX_PAYLOAD:
        return Err.EINVAL if command == Cmd.WRITE else Err.EOVERFLOW
    if end > export_size:
        return Err.ENOSPC if command in _CHANGES else Err.EINVAL
    if read_only and command in _CHANGES:
        return Err.EPERM
    return Err.OK


def payload_owned(view: memoryview) -> memoryview:
    """``view`` if it is all of its buffer, else a copy of it.

    A payload view into a received chunk keeps the whole chunk alive; the
    budget charges only the payload. Work that outlives the call it was
    handed to takes its own copy, so memory matches what was charged.
    """
    if memoryview(view.obj).nbytes == view.nbytes:
        return view
    return memoryview(bytes(view))


class _State(enum.Enum):
    HEADER = "header"
    PAYLOAD = "payload"
    SKIP = "skip"
    CLOSED = "closed"


class RequestDecoder:
    """Server side of the transmission phase: bytes in, requests out.

    Feed what the socket delivered to :meth:`receive_data`, then call
    :meth:`next_event` until it returns :data:`NEED_DATA`. Stopping early is
    how a caller applies back-pressure: the bytes not decoded yet stay here
    (see :attr:`buffered`) until it calls again. A wrong request magic
    raises :class:`ProtocolError`: the stream has no boundaries left to
    trust, so the connection ends.

    Payloads are views into the received ``bytes`` when a payload arrived
    in one piece; one spread over several pieces is gathered (the one copy)
    into a buffer of its own. Received bytes must not change afterwards
    (``bytes`` from ``data_received`` never do).
    """

    __slots__ = (
        "_chunk",
        "_chunks",
        "_header",
        "_header_fill",
        "_payload",
        "_payload_fill",
        "_pos",
        "_request",
        "_skip",
        "_state",
        "export_size",
        "read_only",
    )

    def __init__(self, *, export_size: int, read_only: bool = False) -> None:
        self.export_size = export_size
        self.read_only = read_only
        self._chunks: deque[bytes] = deque()  # received, after the current one
        self._chunk = b""  # the chunk being decoded
        self._pos = 0  # how far into it
        self._state = _State.HEADER
        self._request: Request | None = None  # the WRITE whose payload is awaited
        self._header = bytearray(REQUEST_HEADER_SIZE)
        self._header_fill = 0
        self._payload: memoryview | None = None  # a payload being gathered
        self._payload_fill = 0
        self._skip = 0  # payload bytes still to skip

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        if self._pos >= len(self._chunk) and not self._chunks:
            self._chunk = data
            self._pos = 0
        else:
            self._chunks.append(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not decoded yet."""
        return len(self._chunk) - self._pos + sum(len(c) for c in self._chunks)

    @property
    def between_requests(self) -> bool:
        """Whether the next bytes start (or continue) a request header."""
        return self._state is _State.HEADER

    @property
    def payload_progress(self) -> tuple[int, int] | None:
        """(bytes received, length) of the payload underway, or None."""
        request = self._request
        if request is None:
            return None
        got = request.length - self._skip if self._state is _State.SKIP else self._payload_fill
        return min(got + self.buffered, request.length), request.length

    def clear(self) -> None:
        """Forget everything received (the connection is going away)."""
        self._chunks.clear()
        self._chunk = b""
        self._pos = 0
        self._payload = None
        self._request = None
        self._state = _State.CLOSED

    def _advance(self) -> bool:
        """Move to the next received chunk; False if there is none."""
        if not self._chunks:
            self._chunk = b""
            self._pos = 0
            return False
        self._chunk = self._chunks.popleft()
        self._pos = 0
        return True

    def next_event(self) -> Request | PayloadAhead | NeedData:
        """The next request, :class:`PayloadAhead`, or :data:`NEED_DATA`.

        A WRITE whose payload is here already comes out whole, as one
        :class:`Request`; only one whose payload is still to come is
        announced first with :class:`PayloadAhead`.
        """
        state = self._state
        if state is not _State.HEADER:
            if state is _State.PAYLOAD:
                return self._next_payload()
            if state is _State.SKIP:
                return self._next_skip()
            raise ProtocolError("the request stream has ended")
        chunk = self._chunk
        pos = self._pos
        if self._header_fill == 0 and len(chunk) - pos >= REQUEST_HEADER_SIZE:
            # The hot path: a whole header in the current piece.
            fields = _unpack_header(chunk, pos)
            pos += REQUEST_HEADER_SIZE
        else:
            gathered = self._gather_header()
            if gathered is None:
                return NEED_DATA
            fields = gathered
            chunk = self._chunk
            pos = self._pos
        magic, flags, command, handle, offset, length = fields
        if magic != REQUEST_MAGIC:
            self.clear()
            raise ProtocolError(f"bad request magic {magic:#x}")
        request = Request(flags=flags, command=command, handle=handle, offset=offset, length=length)
        error = request.error = check_request(request, self.export_size, read_only=self.read_only)
        if command != _WRITE or not length:
            self._pos = pos
            return request
        if len(chunk) - pos >= length:
            # The whole payload is here: a view of it (or, refused, skipped).
            self._pos = pos + length
            if not error:
                request.payload = memoryview(chunk)[pos : pos + length]
            return request
        self._pos = pos
        self._request = request
        if error:
            self._state = _State.SKIP
            self._skip = length
        else:
            self._state = _State.PAYLOAD
            self._payload_fill = 0
        return PayloadAhead(request)

    def _gather_header(self) -> tuple[int, int, int, int, int, int] | None:
        """A header spread over pieces, copied together; None until complete."""
        header = self._header
        chunk = self._chunk
        pos = self._pos
        while self._header_fill < REQUEST_HEADER_SIZE:
            if pos >= len(chunk):
                if not self._advance():
                    return None
                chunk = self._chunk
                pos = 0
                if self._header_fill == 0 and len(chunk) >= REQUEST_HEADER_SIZE:
                    break  # a whole header at the start of the next piece
            take = min(REQUEST_HEADER_SIZE - self._header_fill, len(chunk) - pos)
            header[self._header_fill : self._header_fill + take] = chunk[pos : pos + take]
            self._header_fill += take
            pos += take
        if self._header_fill == 0:
            fields: tuple[int, int, int, int, int, int] = _unpack_header(chunk, 0)
            self._pos = REQUEST_HEADER_SIZE
            return fields
        self._header_fill = 0
        self._pos = pos
        fields = _unpack_header(header, 0)
        return fields

    def _next_payload(self) -> Request | NeedData:
        request = self._request
        assert request is not None
        length = request.length
        chunk = self._chunk
        pos = self._pos
        payload = self._payload
        if payload is None:
            if len(chunk) - pos >= length:
                # The common case: all of it in one received piece, no copy.
                self._pos = pos + length
                return self._complete(memoryview(chunk)[pos : pos + length])
            # Spread over pieces: gathered into a buffer of its own (a
            # memoryview target, as bytearray slice assignment copies twice).
            payload = self._payload = memoryview(bytearray(length))
        fill = self._payload_fill
        while True:
            take = min(length - fill, len(chunk) - pos)
            if take:
                payload[fill : fill + take] = memoryview(chunk)[pos : pos + take]
                fill += take
                pos += take
            self._pos = pos
            self._payload_fill = fill
            if fill == length:
                self._payload = None
                return self._complete(payload)
            if not self._advance():
                return NEED_DATA
            chunk = self._chunk
            pos = 0

    def _next_skip(self) -> Request | NeedData:
        while True:
            take = min(self._skip, len(self._chunk) - self._pos)
            self._pos += take
            self._skip -= take
            if not self._skip:
                return self._complete(None)
            if not self._advance():
                return NEED_DATA

    def _complete(self, payload: memoryview | None) -> Request:
        request = self._request
        assert request is not None
        self._request = None
        self._state = _State.HEADER
        request.payload = payload
        return request


def decode_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode one 28-byte request header (no check against an export)."""
    if len(header) != REQUEST_HEADER_SIZE:
        raise ProtocolError(f"request header must be {REQUEST_HEADER_SIZE} bytes")
    magic, flags, command, handle, offset, length = REQUEST_HEADER.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags=flags, command=command, handle=handle, offset=offset, length=length)


def encode_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header as a client sends it (a WRITE's payload follows it)."""
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


# --- replies, as the server sends them -------------------------------------------------


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def structured_read_header(handle: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk; the data follows it."""
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + length
    ) + U64.pack(offset)


def structured_done(handle: int) -> bytes:
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0
    )


def structured_error(handle: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:1024]
    body = struct.pack(">IH", error, len(text)) + text
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(body)
        )
        + body
    )


def structured_block_status(
    handle: int, context_id: int, extents: Iterable[tuple[int, int]]
) -> bytes:
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len(body)
        )
        + body
    )


def transmission_flags(*, read_only: bool = False) -> int:
    """The flags portalbd advertises: exactly what the server implements."""
    flags = (
        TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_DF
        | TF_CAN_MULTI_CONN
        | TF_SEND_CACHE
        | TF_SEND_FAST_ZERO
    )
    if read_only:
        flags |= TF_READ_ONLY
    return flags
