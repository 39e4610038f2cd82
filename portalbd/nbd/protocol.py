"""The NBD wire protocol as pure data: constants, layouts, encoders, decoders.

Nothing here touches a socket. The handshake is a state machine
(:class:`ServerHandshake`) that takes bytes in and hands bytes and events out,
so it can be driven byte by byte in tests and fuzzed; the transmission phase
is a handful of struct layouts that the server uses on its hot path.

The numbers come from the NBD protocol specification (doc/proto.md in
github.com/NetworkBlockDevice/nbd).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# --- magic numbers -------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags -----------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# --- transmission flags (per export) --------------------------------------

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
KNOWN_CMD_FLAGS = (
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO
)

# Which flags each command may carry; anything else is EINVAL.
ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: 0,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}


class Err(enum.IntEnum):
    """Error numbers on the wire (fixed by the spec, not the host's errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# structured reply chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation extent flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

# --- layouts ---------------------------------------------------------------

SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")

REQUEST_HEADER_SIZE = REQUEST_HEADER.size  # 28
MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING_LENGTH = 4096
# The largest READ/WRITE payload served (and advertised as the maximum block
# size). Clients that never negotiate block sizes (old nbd-client builds, test
# tools) send up to 64 MiB, as nbd-server and nbdkit accept; the server's
# payload budget keeps the memory such requests take bounded.
MAX_PAYLOAD = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


# --- exports -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD


# --- handshake events ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TransmissionReady:
    """The handshake finished; the connection now carries requests."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeClosed:
    """The client aborted or the handshake failed; close after sending output."""

    reason: str


_NEED_DATA = object()


class HandshakeState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


def _u32(value: int) -> bytes:
    return U32.pack(value)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def _error_reply(option: int, reply: Rep, message: str) -> bytes:
    return option_reply(option, reply, message.encode()[:MAX_STRING_LENGTH])


class _Reader:
    """Bounds-checked reads from one option payload; overruns are ERR_INVALID."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _InvalidOption("option payload is shorter than its fields say")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
        return value

    def string(self, length: int) -> str:
        if length > MAX_STRING_LENGTH:
            raise _TooBig("string longer than 4096 bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _InvalidOption("string is not UTF-8") from exc

    def done(self) -> None:
        if self.pos != len(self.data):
            raise _InvalidOption("option payload has trailing bytes")


class _InvalidOption(Exception):
    pass


class _TooBig(Exception):
    pass


@dataclass(slots=True)
class ServerHandshake:
    """Server side of the fixed newstyle handshake, with no I/O.

    Feed received bytes to :meth:`receive_data`; it returns the bytes to send
    and, when the handshake ends, a :class:`TransmissionReady` or
    :class:`HandshakeClosed` event. Bytes that arrive after the handshake
    (the first requests, pipelined) are kept in :attr:`leftover`.
    """

    exports: Sequence[ExportInfo]
    default_export: str
    refusal: str | None = None  # when set, no export is served: say why
    refused: int = 0  # how many GO/EXPORT_NAME were answered with the refusal
    state: HandshakeState = HandshakeState.CLIENT_FLAGS
    no_zeroes: bool = False
    structured_replies: bool = False
    meta_contexts: tuple[str, ...] = ()
    leftover: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)

    def greeting(self) -> bytes:
        return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_data(self, data: bytes) -> tuple[bytes, TransmissionReady | HandshakeClosed | None]:
        """Consume bytes; return (bytes to send, final event or None)."""
        if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
            raise ProtocolError("handshake already finished")
        self._buffer += data
        out: list[bytes] = []
        while True:
            event = self._step(out)
            if event is _NEED_DATA:
                return b"".join(out), None
            if event is not None:
                assert isinstance(event, TransmissionReady | HandshakeClosed)
                return b"".join(out), event

    def _step(self, out: list[bytes]) -> TransmissionReady | HandshakeClosed | object | None:
        buf = self._buffer
        if self.state is HandshakeState.CLIENT_FLAGS:
            if len(buf) < CLIENT_FLAGS.size:
                return _NEED_DATA
            (flags,) = CLIENT_FLAGS.unpack_from(buf)
            del buf[: CLIENT_FLAGS.size]
            if flags & ~KNOWN_CLIENT_FLAGS or not flags & CLIENT_FIXED_NEWSTYLE:
                self.state = HandshakeState.CLOSED
                return HandshakeClosed(reason=f"unsupported client flags {flags:#x}")
            self.no_zeroes = bool(flags & CLIENT_NO_ZEROES)
            self.state = HandshakeState.OPTIONS
            return None
        if len(buf) < OPTION_HEADER.size:
            return _NEED_DATA
        magic, option, length = OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            self.state = HandshakeState.CLOSED
            return HandshakeClosed(reason=f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            # Too large to skip politely: the spec lets us drop the connection.
            self.state = HandshakeState.CLOSED
            out.append(_error_reply(option, Rep.ERR_TOO_BIG, "option payload too large"))
            return HandshakeClosed(reason=f"option {option} payload of {length} bytes")
        if len(buf) < OPTION_HEADER.size + length:
            return _NEED_DATA
        payload = bytes(buf[OPTION_HEADER.size : OPTION_HEADER.size + length])
        del buf[: OPTION_HEADER.size + length]
        return self._option(option, payload, out)

    def _find_export(self, name: str) -> ExportInfo | None:
        wanted = name or self.default_export
        for export in self.exports:
            if export.name == wanted:
                return export
        return None

    def _finish(self, export: ExportInfo) -> TransmissionReady:
        self.state = HandshakeState.TRANSMISSION
        self.leftover = bytes(self._buffer)
        self._buffer.clear()
        return TransmissionReady(
            export=export,
            structured_replies=self.structured_replies,
            meta_contexts=self.meta_contexts,
        )

    def _option(
        self, option: int, payload: bytes, out: list[bytes]
    ) -> TransmissionReady | HandshakeClosed | None:
        try:
            if option == Opt.EXPORT_NAME:
                return self._export_name(payload, out)
            if option == Opt.ABORT:
                out.append(option_reply(option, Rep.ACK))
                self.state = HandshakeState.CLOSED
                return HandshakeClosed(reason="client aborted the handshake")
            if option == Opt.LIST:
                self._list(option, payload, out)
            elif option in (Opt.INFO, Opt.GO):
                return self._info(option, payload, out)
            elif option == Opt.STRUCTURED_REPLY:
                if payload:
                    raise _InvalidOption("STRUCTURED_REPLY takes no payload")
                self.structured_replies = True
                out.append(option_reply(option, Rep.ACK))
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(option, payload, out)
            else:
                out.append(_error_reply(option, Rep.ERR_UNSUP, f"option {option} not supported"))
        except _InvalidOption as exc:
            out.append(_error_reply(option, Rep.ERR_INVALID, str(exc)))
        except _TooBig as exc:
            out.append(_error_reply(option, Rep.ERR_TOO_BIG, str(exc)))
        return None

    def _export_name(self, payload: bytes, out: list[bytes]) -> TransmissionReady | HandshakeClosed:
        if self.refusal is not None:
            self.refused += 1
            self.state = HandshakeState.CLOSED
            return HandshakeClosed(reason=self.refusal)
        try:
            name = payload.decode("utf-8")
        except UnicodeDecodeError:
            name = "\ufffd"
        export = self._find_export(name)
        if export is None:
            # EXPORT_NAME has no error reply: the spec says close.
            self.state = HandshakeState.CLOSED
            return HandshakeClosed(reason=f"unknown export {name!r}")
        out.append(EXPORT_NAME_REPLY.pack(export.size, export.flags))
        if not self.no_zeroes:
            out.append(bytes(124))
        return self._finish(export)

    def _list(self, option: int, payload: bytes, out: list[bytes]) -> None:
        if payload:
            raise _InvalidOption("LIST takes no payload")
        for export in self.exports:
            name = export.name.encode()
            out.append(option_reply(option, Rep.SERVER, _u32(len(name)) + name))
        out.append(option_reply(option, Rep.ACK))

    def _info(
        self, option: int, payload: bytes, out: list[bytes]
    ) -> TransmissionReady | HandshakeClosed | None:
        reader = _Reader(payload)
        name = reader.string(reader.u32())
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)]
        reader.done()
        export = self._find_export(name)
        if export is None:
            out.append(_error_reply(option, Rep.ERR_UNKNOWN, f"unknown export {name!r}"))
            return None
        if self.refusal is not None:
            self.refused += 1
            out.append(_error_reply(option, Rep.ERR_POLICY, self.refusal))
            return None
        out.append(
            option_reply(
                option,
                Rep.INFO,
                U16.pack(Info.EXPORT) + EXPORT_NAME_REPLY.pack(export.size, export.flags),
            )
        )
        for info in dict.fromkeys(requests):
            if info == Info.NAME:
                out.append(
                    option_reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
                )
            elif info == Info.DESCRIPTION:
                text = export.description.encode()
                out.append(option_reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + text))
        # Block sizes are always worth telling: a client that did not ask may
        # still use them, and our minimum of 1 asks nothing of it.
        out.append(
            option_reply(
                option,
                Rep.INFO,
                U16.pack(Info.BLOCK_SIZE)
                + struct.pack(">III", export.min_block, export.preferred_block, export.max_block),
            )
        )
        out.append(option_reply(option, Rep.ACK))
        if option == Opt.GO:
            return self._finish(export)
        return None

    def _meta_context(self, option: int, payload: bytes, out: list[bytes]) -> None:
        reader = _Reader(payload)
        name = reader.string(reader.u32())
        count = reader.u32()
        if count > 1024:
            raise _TooBig("too many meta context queries")
        queries = [reader.string(reader.u32()) for _ in range(count)]
        reader.done()
        if option == Opt.SET_META_CONTEXT and not self.structured_replies:
            raise _InvalidOption("SET_META_CONTEXT needs structured replies first")
        if self._find_export(name) is None:
            out.append(_error_reply(option, Rep.ERR_UNKNOWN, f"unknown export {name!r}"))
            return
        selected: list[str] = []
        if option == Opt.LIST_META_CONTEXT and not queries:
            selected = [BASE_ALLOCATION]
        for query in queries:
            if query in (BASE_ALLOCATION, "base:") and BASE_ALLOCATION not in selected:
                if option == Opt.SET_META_CONTEXT and query != BASE_ALLOCATION:
                    continue
                selected.append(BASE_ALLOCATION)
        for context in selected:
            out.append(
                option_reply(option, Rep.META_CONTEXT, _u32(BASE_ALLOCATION_ID) + context.encode())
            )
        if option == Opt.SET_META_CONTEXT:
            self.meta_contexts = tuple(selected)
        out.append(option_reply(option, Rep.ACK))


# --- transmission phase ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request header (the payload of a WRITE follows it)."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


def decode_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode a 28-byte request header; a wrong magic ends the connection."""
    if len(header) != REQUEST_HEADER_SIZE:
        raise ProtocolError(f"request header must be {REQUEST_HEADER_SIZE} bytes")
    magic, flags, command, handle, offset, length = REQUEST_HEADER.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, command, handle, offset, length)


def encode_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    """Client side, for tests and the fuzzers."""
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


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
    body = bytearray(_u32(context_id))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len(body)
        )
        + body
    )


def check_request(request: Request, export_size: int) -> int:
    """Validate a request against the export; return an NBD error or 0.

    Pure so that the rules (and their edge cases) are tested without a server.
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
        return Err.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM) else Err.EINVAL
    return Err.OK


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
