"""The fixed newstyle handshake, both roles, as state machines with no I/O.

:class:`ServerHandshake` answers a client's options; :class:`ClientHandshake`
sends them and reads the answers. Both take bytes in and hand bytes and
events out, so they are driven byte by byte in tests and fuzzed, and the
server, the simulation's client and the tests' raw clients share one
implementation of the rules.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from portalbd.nbd.wire import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CLIENT_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    CLIENT_NO_ZEROES,
    EXPORT_NAME_REPLY,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    KNOWN_CLIENT_FLAGS,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    SERVER_GREETING,
    U16,
    U32,
    Info,
    Opt,
    ProtocolError,
    Rep,
)

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
class StartTls:
    """STARTTLS was acknowledged: the caller runs the TLS handshake, then
    calls :meth:`ServerHandshake.tls_started` and feeds the decrypted bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeClosed:
    """The client aborted or the handshake failed; close after sending output."""

    reason: str


_NEED_DATA = object()


class HandshakeState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    STARTING_TLS = "starting-tls"  # ACK sent; no bytes until the caller says TLS is up
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class TlsMode(enum.Enum):
    """What the server asks of a connection's TLS (the spec's NOTLS,
    SELECTIVETLS with every export open, and FORCEDTLS)."""

    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


HandshakeEvent = TransmissionReady | HandshakeClosed | StartTls


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

    With :attr:`tls` on, STARTTLS is acknowledged with a :class:`StartTls`
    event; the caller upgrades the socket and calls :meth:`tls_started`.
    In ``REQUIRE`` mode every option but STARTTLS and ABORT is refused with
    ERR_TLS_REQD until then, and EXPORT_NAME (which cannot be refused)
    closes the connection.
    """

    exports: Sequence[ExportInfo]
    default_export: str
    refusal: str | None = None  # when set, no export is served: say why
    tls: TlsMode = TlsMode.OFF
    tls_active: bool = False  # the caller finished a TLS handshake on this connection
    tls_refused: int = 0  # options answered ERR_TLS_REQD (or EXPORT_NAME closed) for want of TLS
    refused: int = 0  # how many GO/EXPORT_NAME were answered with the refusal
    state: HandshakeState = HandshakeState.CLIENT_FLAGS
    no_zeroes: bool = False
    structured_replies: bool = False
    meta_contexts: tuple[str, ...] = ()
    leftover: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)

    def greeting(self) -> bytes:
        return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_data(self, data: bytes) -> tuple[bytes, HandshakeEvent | None]:
        """Consume bytes; return (bytes to send, event or None).

        :class:`StartTls` is the one event after which the handshake goes on
        (once :meth:`tls_started` is called); the others end it.
        """
        if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
            raise ProtocolError("handshake already finished")
        if self.state is HandshakeState.STARTING_TLS:
            raise ProtocolError("bytes fed while the TLS handshake runs")
        self._buffer += data
        out: list[bytes] = []
        while True:
            event = self._step(out)
            if event is _NEED_DATA:
                return b"".join(out), None
            if event is not None:
                assert isinstance(event, TransmissionReady | HandshakeClosed | StartTls)
                return b"".join(out), event

    def tls_started(self) -> None:
        """The TLS handshake succeeded: options go on, over TLS, from scratch.

        The spec has a client renegotiate structured replies and meta
        contexts after STARTTLS, so what was agreed in plain text is dropped.
        """
        if self.state is not HandshakeState.STARTING_TLS:
            raise ProtocolError("tls_started without an acknowledged STARTTLS")
        self.state = HandshakeState.OPTIONS
        self.tls_active = True
        self.structured_replies = False
        self.meta_contexts = ()

    def _step(self, out: list[bytes]) -> HandshakeEvent | object | None:
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

    def _option(self, option: int, payload: bytes, out: list[bytes]) -> HandshakeEvent | None:
        tls_wanted = self.tls is TlsMode.REQUIRE and not self.tls_active
        try:
            if option == Opt.EXPORT_NAME:
                if tls_wanted:
                    # EXPORT_NAME has no error reply: the spec says close.
                    self.tls_refused += 1
                    self.state = HandshakeState.CLOSED
                    return HandshakeClosed(reason="EXPORT_NAME without TLS, which is required")
                return self._export_name(payload, out)
            if option == Opt.ABORT:
                out.append(option_reply(option, Rep.ACK))
                self.state = HandshakeState.CLOSED
                return HandshakeClosed(reason="client aborted the handshake")
            if option == Opt.STARTTLS and self.tls is not TlsMode.OFF:
                return self._starttls(payload, out)
            if tls_wanted:
                self.tls_refused += 1
                out.append(
                    _error_reply(option, Rep.ERR_TLS_REQD, "TLS is required: STARTTLS first")
                )
            elif option == Opt.LIST:
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

    def _starttls(self, payload: bytes, out: list[bytes]) -> StartTls | HandshakeClosed | None:
        if self.tls_active:
            raise _InvalidOption("TLS is already on")
        if payload:
            raise _InvalidOption("STARTTLS takes no payload")
        if self._buffer:
            # The client must wait for the reply: bytes after STARTTLS would
            # be read as plain text or TLS depending on when they arrived.
            self.state = HandshakeState.CLOSED
            return HandshakeClosed(reason="client sent bytes after STARTTLS before its reply")
        out.append(option_reply(Opt.STARTTLS, Rep.ACK))
        self.state = HandshakeState.STARTING_TLS
        return StartTls()

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


# --- the client's side ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OptionRefused:
    """The server answered one of our options with an error reply."""

    option: int
    reply: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientReady:
    """The server accepted the export; requests may be sent."""

    size: int
    flags: int
    structured_replies: bool
    meta_contexts: dict[str, int]  # negotiated context name -> its id
    block_sizes: tuple[int, int, int] | None  # minimum, preferred, maximum
    refusals: tuple[OptionRefused, ...]  # options refused on the way (not GO)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRefused:
    """The server refused the export (GO answered with an error)."""

    refusal: OptionRefused


_EXPORT_NAME_ZEROES = 124


@dataclass(slots=True)
class ClientHandshake:
    """Client side of the fixed newstyle handshake, with no I/O.

    It sends every option at once after the greeting (pipelined, as the spec
    allows) and reads the replies in order: STRUCTURED_REPLY and
    SET_META_CONTEXT when asked for, then GO, or EXPORT_NAME for the old
    ending that has no error reply. Anything the server sends that the spec
    does not allow raises :class:`ProtocolError`, so tests see a server's
    mistakes instead of papering over them.
    """

    export_name: str = ""
    structured: bool = True
    meta_contexts: Sequence[str] = (BASE_ALLOCATION,)
    go: bool = True
    no_zeroes: bool = True
    leftover: bytes = b""
    finished: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _greeted: bool = False
    _pending: list[int] = field(default_factory=list)
    _structured_ok: bool = False
    _contexts: dict[str, int] = field(default_factory=dict)
    _size: int | None = None
    _flags: int = 0
    _block_sizes: tuple[int, int, int] | None = None
    _refusals: list[OptionRefused] = field(default_factory=list)
    _zeroes: bool = False

    def receive_data(self, data: bytes) -> tuple[bytes, ClientReady | ClientRefused | None]:
        """Consume bytes; return (bytes to send, final event or None)."""
        if self.finished:
            raise ProtocolError("handshake already finished")
        self._buffer += data
        out: list[bytes] = []
        while True:
            event = self._step(out)
            if event is _NEED_DATA:
                return b"".join(out), None
            if event is not None:
                assert isinstance(event, ClientReady | ClientRefused)
                self.finished = True
                self.leftover = bytes(self._buffer)
                self._buffer.clear()
                return b"".join(out), event

    def _take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            return None
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    def _step(self, out: list[bytes]) -> ClientReady | ClientRefused | object | None:
        if not self._greeted:
            return self._greeting(out)
        option = self._pending[0]
        if option == Opt.EXPORT_NAME:
            return self._export_name_reply()
        if len(self._buffer) < OPTION_REPLY_HEADER.size:
            return _NEED_DATA
        magic, replied, reply, length = OPTION_REPLY_HEADER.unpack_from(self._buffer)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if replied != option:
            raise ProtocolError(f"reply for option {replied} while waiting for option {option}")
        if length > MAX_OPTION_LENGTH:
            raise ProtocolError(f"option reply of {length} bytes")
        body = self._take(OPTION_REPLY_HEADER.size + length)
        if body is None:
            return _NEED_DATA
        return self._reply(option, reply, body[OPTION_REPLY_HEADER.size :])

    def _greeting(self, out: list[bytes]) -> object | None:
        raw = self._take(SERVER_GREETING.size)
        if raw is None:
            return _NEED_DATA
        magic, opt_magic, flags = SERVER_GREETING.unpack(raw)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolError(f"bad greeting magic {magic:#x} {opt_magic:#x}")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError(f"server is not fixed newstyle (flags {flags:#x})")
        self._greeted = True
        client_flags = CLIENT_FIXED_NEWSTYLE
        if self.no_zeroes and flags & FLAG_NO_ZEROES:
            client_flags |= CLIENT_NO_ZEROES
        else:
            self._zeroes = True
        out.append(CLIENT_FLAGS.pack(client_flags))
        name = self.export_name.encode()
        if self.structured:
            out.append(option_request(Opt.STRUCTURED_REPLY))
            self._pending.append(Opt.STRUCTURED_REPLY)
            if self.meta_contexts:
                body = U32.pack(len(name)) + name + U32.pack(len(self.meta_contexts))
                for query in self.meta_contexts:
                    raw_query = query.encode()
                    body += U32.pack(len(raw_query)) + raw_query
                out.append(option_request(Opt.SET_META_CONTEXT, body))
                self._pending.append(Opt.SET_META_CONTEXT)
        if self.go:
            body = U32.pack(len(name)) + name + U16.pack(0)
            out.append(option_request(Opt.GO, body))
            self._pending.append(Opt.GO)
        else:
            out.append(option_request(Opt.EXPORT_NAME, name))
            self._pending.append(Opt.EXPORT_NAME)
        return None

    def _export_name_reply(self) -> ClientReady | object:
        size = EXPORT_NAME_REPLY.size + (_EXPORT_NAME_ZEROES if self._zeroes else 0)
        raw = self._take(size)
        if raw is None:
            return _NEED_DATA
        self._size, self._flags = EXPORT_NAME_REPLY.unpack_from(raw)
        return self._ready()

    def _ready(self) -> ClientReady:
        assert self._size is not None
        return ClientReady(
            size=self._size,
            flags=self._flags,
            structured_replies=self._structured_ok,
            meta_contexts=dict(self._contexts),
            block_sizes=self._block_sizes,
            refusals=tuple(self._refusals),
        )

    def _reply(self, option: int, reply: int, payload: bytes) -> ClientReady | ClientRefused | None:
        if reply & (1 << 31):
            self._pending.pop(0)
            refused = OptionRefused(
                option=option, reply=reply, message=payload.decode("utf-8", "replace")
            )
            if option == Opt.GO:
                return ClientRefused(refusal=refused)
            self._refusals.append(refused)
            return None
        if reply == Rep.ACK:
            if payload:
                raise ProtocolError(f"ACK for option {option} carries a payload")
            self._pending.pop(0)
            if option == Opt.STRUCTURED_REPLY:
                self._structured_ok = True
            elif option == Opt.GO:
                if self._size is None:
                    raise ProtocolError("GO acknowledged without INFO_EXPORT")
                return self._ready()
            return None
        if reply == Rep.META_CONTEXT and option == Opt.SET_META_CONTEXT:
            if len(payload) < 4:
                raise ProtocolError("META_CONTEXT reply shorter than its id")
            (context_id,) = U32.unpack_from(payload)
            try:
                self._contexts[payload[4:].decode("utf-8")] = context_id
            except UnicodeDecodeError as exc:
                raise ProtocolError("meta context name is not UTF-8") from exc
            return None
        if reply == Rep.INFO and option == Opt.GO:
            self._info(payload)
            return None
        raise ProtocolError(f"unexpected reply {reply} to option {option}")

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("INFO reply shorter than its type")
        (info,) = U16.unpack_from(payload)
        if info == Info.EXPORT:
            if len(payload) != 2 + EXPORT_NAME_REPLY.size:
                raise ProtocolError(f"INFO_EXPORT of {len(payload)} bytes")
            self._size, self._flags = EXPORT_NAME_REPLY.unpack_from(payload, 2)
        elif info == Info.BLOCK_SIZE:
            if len(payload) != 14:
                raise ProtocolError(f"INFO_BLOCK_SIZE of {len(payload)} bytes")
            minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            self._block_sizes = (minimum, preferred, maximum)
        # NAME, DESCRIPTION and unknown infos are for humans: skipped.


def option_request(option: int, payload: bytes = b"") -> bytes:
    """One option as a client sends it."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload
