"""Fuzzing the NBD codec in-process with hypothesis: the code that serves.

The rule, after h11's fuzz harness: valid input parses, anything else raises
ProtocolError or ends the handshake with a reason, and nothing else ever
escapes. Handshakes are fed whole and one byte at a time and must produce
the same output both ways; request streams (the server's RequestDecoder,
which NbdConnection feeds) decode the same however they are cut; the
client's handshake and ReplyDecoder meet the server's side and random bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalbd.nbd import protocol as p

EXPORTS = [p.ExportInfo(name="disk", size=1 << 20, flags=p.transmission_flags())]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _server(refusal: str | None = None) -> p.ServerHandshake:
    return p.ServerHandshake(exports=EXPORTS, default_export="disk", refusal=refusal)


def _feed(data: bytes, *, bytewise: bool) -> tuple[bytes, object, p.ServerHandshake]:
    hs = _server()
    out = bytearray()
    event: object = None
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        try:
            sent, event = hs.receive_data(chunk)
        except p.ProtocolError:
            return bytes(out), "protocol-error", hs
        out += sent
        if event is not None:
            break
    return bytes(out), event, hs


def option(opt: int, payload: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(payload)) + payload


def go_payload(name: bytes = b"disk", infos: tuple[int, ...] = ()) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return body + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


FLAGS = struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES)

valid_options = st.one_of(
    st.just(option(p.Opt.STRUCTURED_REPLY)),
    st.just(option(p.Opt.LIST)),
    st.builds(
        lambda q: option(p.Opt.LIST_META_CONTEXT, meta_payload(b"disk", q)),
        st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:dirty"]), max_size=3),
    ),
    st.builds(
        lambda infos: option(p.Opt.INFO, go_payload(b"disk", tuple(infos))),
        st.lists(st.integers(0, 5), max_size=4),
    ),
    st.builds(lambda n: option(n, b""), st.integers(12, 1 << 31)),  # unknown: ERR_UNSUP
)
finishers = st.one_of(
    st.just(option(p.Opt.GO, go_payload())),
    st.just(option(p.Opt.GO, go_payload(b""))),  # empty name = default export
    st.just(option(p.Opt.EXPORT_NAME, b"disk")),
)


@FUZZ
@given(st.lists(valid_options, max_size=6), finishers, st.binary(max_size=64))
def test_valid_handshakes_reach_transmission(
    options: list[bytes], finish: bytes, trailing: bytes
) -> None:
    data = FLAGS + b"".join(options) + finish + trailing
    whole, event, hs = _feed(data, bytewise=False)
    assert isinstance(event, p.TransmissionReady), event
    assert event.export.name == "disk"
    assert hs.leftover == trailing  # pipelined requests are kept, not lost
    bytewise, event2, _ = _feed(data, bytewise=True)
    assert isinstance(event2, p.TransmissionReady)
    assert bytewise == whole


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_escape(data: bytes) -> None:
    for bytewise in (False, True):
        _out, event, _hs = _feed(data, bytewise=bytewise)
        assert event in (None, "protocol-error") or isinstance(
            event, p.TransmissionReady | p.HandshakeClosed
        )


@st.composite
def mutated_handshakes(draw: st.DrawFn) -> bytes:
    """A valid handshake with bytes flipped, cut out or inserted."""
    data = bytearray(FLAGS + b"".join(draw(st.lists(valid_options, max_size=4))) + draw(finishers))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:  # a huge or wrong length field somewhere
            data[pos : pos + 4] = struct.pack(
                ">I", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 65537]))
            )
    return bytes(data)


@FUZZ
@given(mutated_handshakes())
def test_mutated_handshakes_fail_cleanly_the_same_way_whole_and_bytewise(data: bytes) -> None:
    whole, event, _ = _feed(data, bytewise=False)
    bytewise, event2, _ = _feed(data, bytewise=True)
    assert type(event) is type(event2)
    assert whole == bytewise


@FUZZ
@given(st.binary(max_size=80))
def test_refusing_server_never_serves(data: bytes) -> None:
    hs = _server(refusal="restore in progress")
    try:
        _out, event = hs.receive_data(FLAGS + data + option(p.Opt.EXPORT_NAME, b"disk"))
    except p.ProtocolError:
        return
    assert not isinstance(event, p.TransmissionReady)


tls_options = st.lists(
    st.one_of(valid_options, finishers, st.just(option(p.Opt.STARTTLS)), st.binary(max_size=12)),
    max_size=6,
)


def _option_replies(data: bytes) -> list[int]:
    kinds = []
    while len(data) >= p.OPTION_REPLY_HEADER.size:
        _magic, _opt, reply, length = p.OPTION_REPLY_HEADER.unpack_from(data)
        kinds.append(reply)
        data = data[p.OPTION_REPLY_HEADER.size + length :]
    return kinds


@FUZZ
@given(tls_options, st.sampled_from([p.TlsMode.ALLOW, p.TlsMode.REQUIRE]))
def test_tls_server_fails_cleanly_and_never_serves_plain_text_when_required(
    parts: list[bytes], mode: p.TlsMode
) -> None:
    """Options (STARTTLS among them) and junk against a TLS server: only
    ProtocolError escapes, and in REQUIRE mode nothing but STARTTLS and ABORT
    is answered (ERR_TLS_REQD for the rest) and transmission is never reached
    before TLS is up."""
    stream = FLAGS + b"".join(parts)
    events = []
    for bytewise in (False, True):
        hs = p.ServerHandshake(exports=EXPORTS, default_export="disk", tls=mode)
        chunks = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
        out, event = bytearray(), None
        with contextlib.suppress(p.ProtocolError):
            for chunk in chunks:
                sent, event = hs.receive_data(chunk)
                out += sent
                if event is not None:
                    break
        events.append(type(event))
        if mode is p.TlsMode.REQUIRE:
            assert not isinstance(event, p.TransmissionReady)
            assert set(_option_replies(bytes(out))) <= {
                p.Rep.ERR_TLS_REQD,
                p.Rep.ACK,
                p.Rep.ERR_TOO_BIG,
            }
    # Bytes behind a STARTTLS close the connection when they come with it
    # and cannot be seen when they come after it: the one allowed difference.
    if events[0] is not events[1]:
        assert set(events) == {p.HandshakeClosed, p.StartTls}


def test_feeding_after_the_end_is_a_protocol_error() -> None:
    hs = _server()
    _out, event = hs.receive_data(FLAGS + option(p.Opt.ABORT))
    assert isinstance(event, p.HandshakeClosed)
    try:
        hs.receive_data(b"more")
    except p.ProtocolError as exc:
        assert "already finished" in str(exc)
    else:
        raise AssertionError("bytes after the handshake were accepted")


def test_oversized_option_is_refused_with_err_too_big() -> None:
    hs = _server()
    header = p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.GO, p.MAX_OPTION_LENGTH + 1)
    out, event = hs.receive_data(FLAGS + header)
    assert isinstance(event, p.HandshakeClosed)
    _magic, _opt, reply, _len = p.OPTION_REPLY_HEADER.unpack(out[: p.OPTION_REPLY_HEADER.size])
    assert reply == p.Rep.ERR_TOO_BIG


# --- transmission phase: the server's RequestDecoder ----------------------------------

SIZE = 1 << 20

requests = st.builds(
    p.Request,
    flags=st.integers(0, 0xFFFF),
    command=st.integers(0, 0xFFFF),
    handle=st.integers(0, (1 << 64) - 1),
    offset=st.integers(0, (1 << 64) - 1),
    length=st.integers(0, (1 << 32) - 1),
)


@FUZZ
@given(requests)
def test_request_headers_roundtrip(request: p.Request) -> None:
    raw = p.encode_request(
        request.command, request.handle, request.offset, request.length, request.flags
    )
    assert p.decode_request(raw) == request


@st.composite
def wire_requests(draw: st.DrawFn) -> tuple[p.Request, bytes]:
    """A request the way clients send them, right or wrong, with its payload."""
    command = draw(st.sampled_from([*range(9), 12, 0xFFFF, p.Cmd.WRITE, p.Cmd.WRITE]))
    flags = draw(st.sampled_from([0, 0, p.CMD_FLAG_FUA, p.CMD_FLAG_NO_HOLE, 0x8000]))
    offset = draw(st.sampled_from([0, 4096, SIZE - 100, SIZE, (1 << 64) - 1]))
    big = command != p.Cmd.WRITE and draw(st.booleans())
    length = p.MAX_PAYLOAD + 1 if big else draw(st.integers(0, 3000))
    request = p.Request(
        flags=flags,
        command=command,
        handle=draw(st.integers(0, 1 << 20)),
        offset=offset,
        length=length,
    )
    payload = draw(st.binary(min_size=length, max_size=length)) if command == p.Cmd.WRITE else b""
    return request, payload


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _decode(
    chunks: list[bytes], *, read_only: bool = False
) -> tuple[list[p.Request], list[p.PayloadAhead], str | None]:
    """Feed chunks as data_received does; collect requests until NEED_DATA or an error."""
    decoder = p.RequestDecoder(export_size=SIZE, read_only=read_only)
    got: list[p.Request] = []
    ahead: list[p.PayloadAhead] = []
    announced: p.Request | None = None
    for chunk in chunks:
        decoder.receive_data(chunk)
        while True:
            try:
                event = decoder.next_event()
            except p.ProtocolError as exc:
                return got, ahead, str(exc)
            if event is p.NEED_DATA:
                assert decoder.buffered == 0  # everything received was taken in
                break
            if isinstance(event, p.PayloadAhead):
                # Only a WRITE whose payload is still to come, and the next
                # request out is that one.
                assert announced is None
                assert event.request.command == p.Cmd.WRITE and event.request.length
                assert decoder.payload_progress is not None
                assert not decoder.between_requests
                announced = event.request
                ahead.append(event)
            else:
                assert announced is None or event is announced
                announced = None
                assert decoder.between_requests
                got.append(event)
    return got, ahead, None


def _expected(request: p.Request, payload: bytes, read_only: bool) -> tuple[object, ...]:
    error = p.check_request(request, SIZE, read_only=read_only)
    data = payload if request.command == p.Cmd.WRITE and not error and request.length else None
    return (
        request.flags,
        request.command,
        request.handle,
        request.offset,
        request.length,
        error,
        data,
    )


def _seen(request: p.Request) -> tuple[object, ...]:
    data = None if request.payload is None else bytes(request.payload)
    return (
        request.flags,
        request.command,
        request.handle,
        request.offset,
        request.length,
        request.error,
        data,
    )


@FUZZ
@given(
    st.lists(wire_requests(), max_size=8),
    st.lists(st.integers(0, 1 << 16), max_size=12),
    st.booleans(),
)
def test_request_streams_decode_the_same_however_they_are_cut(
    sent: list[tuple[p.Request, bytes]], cuts: list[int], read_only: bool
) -> None:
    stream = b"".join(
        p.encode_request(r.command, r.handle, r.offset, r.length, r.flags) + payload
        for r, payload in sent
    )
    want = [_expected(r, payload, read_only) for r, payload in sent]
    for chunks in (_cut(stream, cuts), [stream[i : i + 1] for i in range(len(stream))]):
        got, ahead, error = _decode(chunks, read_only=read_only)
        assert error is None
        assert [_seen(r) for r in got] == want
        for announced in ahead:  # every PayloadAhead is followed by its request
            assert any(r is announced.request for r in got)
    # Fed whole, nothing is announced ahead and no payload is copied.
    got, ahead, _ = _decode([stream], read_only=read_only)
    assert not ahead
    for request in got:
        if request.payload is not None:
            assert request.payload.obj is stream
            owned = p.payload_owned(request.payload)  # a copy: the view pins the stream
            assert owned is not request.payload and owned == request.payload


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_random_request_bytes_raise_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    got, _ahead, error = _decode(_cut(data, cuts))
    for request in got:
        assert request.error in set(p.Err)
    if error is not None:
        assert error.startswith("bad request magic")


@FUZZ
@given(st.binary(min_size=28, max_size=40))
def test_a_broken_stream_stays_broken(data: bytes) -> None:
    decoder = p.RequestDecoder(export_size=SIZE)
    decoder.receive_data(struct.pack(">I", p.REQUEST_MAGIC ^ 1) + data)
    for message in ("bad request magic", "the request stream has ended"):
        try:
            decoder.next_event()
        except p.ProtocolError as exc:
            assert message in str(exc)
        else:
            raise AssertionError("a wrong magic was accepted")


@FUZZ
@given(st.binary(max_size=40))
def test_decode_request_raises_only_protocol_error(data: bytes) -> None:
    try:
        request = p.decode_request(data)
    except p.ProtocolError:
        return
    assert len(data) == p.REQUEST_HEADER_SIZE
    assert data[:4] == struct.pack(">I", p.REQUEST_MAGIC)
    assert (
        p.encode_request(
            request.command, request.handle, request.offset, request.length, request.flags
        )
        == data
    )


@FUZZ
@given(requests, st.integers(0, 1 << 50), st.booleans())
def test_check_request_never_lets_a_bad_request_through(
    request: p.Request, size: int, read_only: bool
) -> None:
    error = p.check_request(request, size, read_only=read_only)
    assert error in set(p.Err)
    if read_only:
        writable = p.check_request(request, size)
        changes = request.command in (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)
        assert error == (p.Err.EPERM if changes and not writable else writable)
    if error:
        return
    allowed = p.ALLOWED_FLAGS[request.command]  # KeyError here: unknown command accepted
    assert request.flags & ~allowed == 0
    if request.command not in (p.Cmd.FLUSH, p.Cmd.DISC):
        assert request.offset + request.length <= size
    if request.command in (p.Cmd.READ, p.Cmd.WRITE):
        assert request.length <= p.MAX_PAYLOAD


# --- the client's side: ClientHandshake against ServerHandshake ----------------------


def _converse(
    client: p.ClientHandshake, server: p.ServerHandshake, cut: int
) -> tuple[object, object]:
    """Run both handshakes against each other, bytes moving ``cut`` at a time."""
    to_client = server.greeting()
    to_server = b""
    client_event: object = None
    server_event: object = None
    while True:
        if to_client and client_event is None:
            piece, to_client = to_client[:cut], to_client[cut:]
            out, client_event = client.receive_data(piece)
            to_server += out
        elif to_server and server_event is None:
            piece, to_server = to_server[:cut], to_server[cut:]
            out, server_event = server.receive_data(piece)
            to_client += out
        else:
            return client_event, server_event


@FUZZ
@given(
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["disk", "", "nope"]),
    st.integers(1, 64),
)
def test_client_and_server_handshakes_agree(
    structured: bool, meta: bool, go: bool, name: str, cut: int
) -> None:
    client = p.ClientHandshake(
        export_name=name,
        structured=structured,
        meta_contexts=(p.BASE_ALLOCATION,) if meta else (),
        go=go,
    )
    client_event, server_event = _converse(client, _server(), cut)
    if name == "nope":
        if go:
            assert isinstance(client_event, p.ClientRefused)
            assert client_event.refusal.reply == p.Rep.ERR_UNKNOWN
            assert "unknown export 'nope'" in client_event.refusal.message
        else:  # EXPORT_NAME has no error reply: the server closes
            assert client_event is None and isinstance(server_event, p.HandshakeClosed)
        return
    assert isinstance(client_event, p.ClientReady), client_event
    assert isinstance(server_event, p.TransmissionReady)
    assert (client_event.size, client_event.flags) == (1 << 20, EXPORTS[0].flags)
    assert client_event.structured_replies == structured == server_event.structured_replies
    negotiated = structured and meta
    assert client_event.meta_contexts == ({p.BASE_ALLOCATION: 1} if negotiated else {})
    assert server_event.meta_contexts == ((p.BASE_ALLOCATION,) if negotiated else ())
    assert (client_event.block_sizes is not None) == go
    assert client_event.refusals == ()
    assert client.leftover == b""


def test_client_sees_a_refusing_server_say_why() -> None:
    client = p.ClientHandshake(export_name="disk")
    client_event, _ = _converse(client, _server(refusal="restore in progress"), 7)
    assert isinstance(client_event, p.ClientRefused)
    assert client_event.refusal.option == p.Opt.GO
    assert client_event.refusal.reply == p.Rep.ERR_POLICY
    assert client_event.refusal.message == "restore in progress"


def _client_feed(data: bytes, cut: int) -> object:
    client = p.ClientHandshake(export_name="disk")
    event: object = None
    for i in range(0, len(data), cut):
        try:
            _out, event = client.receive_data(data[i : i + cut])
        except p.ProtocolError:
            return "protocol-error"
        if event is not None:
            return event
    return event


@FUZZ
@given(st.binary(max_size=300), st.integers(1, 32))
def test_client_handshake_random_bytes_raise_only_protocol_error(data: bytes, cut: int) -> None:
    greeting = _server().greeting()
    for stream in (data, greeting + data):
        event = _client_feed(stream, cut)
        assert event in (None, "protocol-error") or isinstance(
            event, p.ClientReady | p.ClientRefused
        )


@FUZZ
@given(st.data())
def test_client_handshake_mutated_server_output_fails_cleanly(data: st.DataObject) -> None:
    client = p.ClientHandshake(export_name="disk")
    server = _server()
    _converse(client, server, 1 << 16)
    # What a server says to a client asking for everything, then broken.
    replay = p.ClientHandshake(export_name="disk")
    out, _ = replay.receive_data(server.greeting())
    answer, _ = _server().receive_data(out)
    stream = bytearray(server.greeting() + answer)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] ^= data.draw(st.integers(1, 255))
    whole = _client_feed(bytes(stream), len(stream))
    bytewise = _client_feed(bytes(stream), 1)
    assert type(whole) is type(bytewise)


# --- the client's side: ReplyDecoder against the server's reply encoders ---------------


@st.composite
def replies_to_requests(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, int, int, int]], bytes, list[tuple[object, ...]]]:
    """Requests (handle, command, offset, length) and what a server answers them."""
    sent: list[tuple[int, int, int, int]] = []
    stream = b""
    want: list[tuple[object, ...]] = []
    for handle in range(draw(st.integers(0, 6))):
        command = draw(st.sampled_from([p.Cmd.READ, p.Cmd.WRITE, p.Cmd.BLOCK_STATUS]))
        offset = draw(st.integers(0, 1 << 30))
        length = draw(st.integers(1, 2000))
        sent.append((handle, command, offset, length))
        kind = draw(st.sampled_from(["simple", "error", "structured", "structured-error"]))
        if kind == "error":
            error = draw(st.sampled_from([p.Err.EIO, p.Err.EINVAL]))
            stream += p.simple_reply(handle, error)
            want.append(("simple", handle, error, b""))
        elif kind == "structured-error":
            message = draw(st.text(max_size=20))
            stream += p.structured_error(handle, p.Err.EIO, message)
            want.append(("chunk", handle, p.REPLY_TYPE_ERROR, True, p.Err.EIO, message, b"", ()))
        elif command == p.Cmd.READ:
            payload = draw(st.binary(min_size=length, max_size=length))
            if kind == "simple":
                stream += p.simple_reply(handle) + payload
                want.append(("simple", handle, 0, payload))
            else:
                stream += p.structured_read_header(handle, offset, length) + payload
                want.append(("chunk", handle, p.REPLY_TYPE_OFFSET_DATA, True, 0, "", payload, ()))
        elif command == p.Cmd.BLOCK_STATUS and kind == "structured":
            extents = draw(
                st.lists(
                    st.tuples(st.integers(1, 1 << 20), st.integers(0, 3)), min_size=1, max_size=5
                )
            )
            stream += p.structured_block_status(handle, p.BASE_ALLOCATION_ID, extents)
            want.append(
                ("chunk", handle, p.REPLY_TYPE_BLOCK_STATUS, True, 0, "", b"", tuple(extents))
            )
        elif kind == "structured":
            stream += p.structured_done(handle)
            want.append(("chunk", handle, p.REPLY_TYPE_NONE, True, 0, "", b"", ()))
        else:
            stream += p.simple_reply(handle)
            want.append(("simple", handle, 0, b""))
    return sent, stream, want


def _reply_events(
    sent: Sequence[tuple[int, int, int, int]], chunks: list[bytes]
) -> tuple[list[tuple[object, ...]], p.ReplyDecoder]:
    decoder = p.ReplyDecoder()
    for handle, command, offset, length in sent:
        decoder.expect(handle, command, offset, length)
    got: list[tuple[object, ...]] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not p.NEED_DATA:
            if isinstance(event, p.SimpleReply):
                got.append(("simple", event.handle, event.error, event.data))
            else:
                got.append(
                    (
                        "chunk",
                        event.handle,
                        event.kind,
                        event.done,
                        event.error,
                        event.message,
                        event.data,
                        event.extents,
                    )
                )
    return got, decoder


@FUZZ
@given(replies_to_requests(), st.lists(st.integers(0, 1 << 14), max_size=10))
def test_replies_decode_the_same_however_they_are_cut(
    case: tuple[list[tuple[int, int, int, int]], bytes, list[tuple[object, ...]]],
    cuts: list[int],
) -> None:
    sent, stream, want = case
    for chunks in (_cut(stream, cuts), [stream[i : i + 1] for i in range(len(stream))]):
        got, decoder = _reply_events(sent, chunks)
        assert got == want
        assert decoder.in_flight == 0


@FUZZ
@given(replies_to_requests(), st.data())
def test_mutated_replies_raise_only_protocol_error(
    case: tuple[list[tuple[int, int, int, int]], bytes, list[tuple[object, ...]]],
    data: st.DataObject,
) -> None:
    sent, stream, _want = case
    broken = bytearray(stream + data.draw(st.binary(max_size=40)))
    for _ in range(data.draw(st.integers(1, 4))):
        if not broken:
            break
        pos = data.draw(st.integers(0, len(broken) - 1))
        broken[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(p.ProtocolError):
        _reply_events(sent, [bytes(broken)])


@FUZZ
@given(st.binary(max_size=200))
def test_random_reply_bytes_raise_only_protocol_error(data: bytes) -> None:
    sent = [(1, p.Cmd.READ, 0, 16), (2, p.Cmd.BLOCK_STATUS, 0, 4096), (3, p.Cmd.WRITE, 0, 8)]
    for magic in (
        b"",
        struct.pack(">I", p.SIMPLE_REPLY_MAGIC),
        struct.pack(">I", p.STRUCTURED_REPLY_MAGIC),
    ):
        with contextlib.suppress(p.ProtocolError):
            _reply_events(sent, [magic + data])
