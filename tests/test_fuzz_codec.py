"""Fuzzing the NBD codec in-process with hypothesis.

The rule, after h11's fuzz harness: valid input parses, anything else raises
ProtocolError or ends the handshake with a reason, and nothing else ever
escapes. Handshakes are fed whole and one byte at a time and must produce
the same output both ways.
"""

from __future__ import annotations

import struct

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


# --- transmission phase ------------------------------------------------------------

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
@given(requests, st.integers(0, 1 << 50))
def test_check_request_never_lets_a_bad_request_through(request: p.Request, size: int) -> None:
    error = p.check_request(request, size)
    assert error in set(p.Err)
    if error:
        return
    allowed = p.ALLOWED_FLAGS[request.command]  # KeyError here: unknown command accepted
    assert request.flags & ~allowed == 0
    if request.command not in (p.Cmd.FLUSH, p.Cmd.DISC):
        assert request.offset + request.length <= size
    if request.command in (p.Cmd.READ, p.Cmd.WRITE):
        assert request.length <= p.MAX_PAYLOAD
