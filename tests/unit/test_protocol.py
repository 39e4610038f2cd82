"""The NBD codec and handshake state machine, without sockets."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portalbd.nbd import protocol as p

EXPORT = p.ExportInfo(
    name="portalbd", size=1 << 30, flags=p.transmission_flags(), preferred_block=65536
)


def machine() -> p.ServerHandshake:
    return p.ServerHandshake(exports=[EXPORT], default_export="portalbd")


def option(opt: int, payload: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(payload)) + payload


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, payload)."""
    out = []
    while data:
        magic, opt, rep, length = p.OPTION_REPLY_HEADER.unpack_from(data)
        assert magic == p.OPTION_REPLY_MAGIC
        start = p.OPTION_REPLY_HEADER.size
        out.append((opt, rep, data[start : start + length]))
        data = data[start + length :]
    return out


def info_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


FLAGS = struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES)


def test_greeting_advertises_fixed_newstyle_and_no_zeroes() -> None:
    magic, opt, flags = p.SERVER_GREETING.unpack(machine().greeting())
    assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


def test_go_with_block_size_and_pipelined_request() -> None:
    m = machine()
    request = p.encode_request(p.Cmd.READ, 7, 0, 512)
    out, event = m.receive_data(
        FLAGS + option(p.Opt.GO, info_payload("", p.Info.BLOCK_SIZE, p.Info.NAME)) + request
    )
    assert isinstance(event, p.TransmissionReady)
    assert event.export.name == "portalbd"  # the empty name reaches the default export
    assert m.leftover == request
    got = replies(out)
    assert got[-1][1] == p.Rep.ACK
    infos = {struct.unpack(">H", payload[:2])[0]: payload[2:] for _, rep, payload in got[:-1]}
    assert struct.unpack(">QH", infos[p.Info.EXPORT]) == (EXPORT.size, EXPORT.flags)
    assert infos[p.Info.NAME] == b"portalbd"
    assert struct.unpack(">III", infos[p.Info.BLOCK_SIZE]) == (1, 65536, 64 * 1024 * 1024)


def test_byte_at_a_time_gives_the_same_result() -> None:
    stream = FLAGS + option(p.Opt.STRUCTURED_REPLY) + option(p.Opt.GO, info_payload("portalbd"))
    whole, event_whole = machine().receive_data(stream)
    m = machine()
    out = b""
    event = None
    for i in range(len(stream)):
        chunk, event = m.receive_data(stream[i : i + 1])
        out += chunk
        if event is not None:
            assert i == len(stream) - 1
    assert out == whole
    assert event == event_whole
    assert isinstance(event, p.TransmissionReady) and event.structured_replies


def test_unknown_export_and_unknown_option() -> None:
    m = machine()
    out, event = m.receive_data(
        FLAGS + option(p.Opt.INFO, info_payload("nope")) + option(99) + option(p.Opt.STARTTLS)
    )
    assert event is None
    assert [rep for _, rep, _ in replies(out)] == [
        p.Rep.ERR_UNKNOWN,
        p.Rep.ERR_UNSUP,
        p.Rep.ERR_UNSUP,
    ]


def test_export_name_unknown_closes() -> None:
    _out, event = machine().receive_data(FLAGS + option(p.Opt.EXPORT_NAME, b"other"))
    assert isinstance(event, p.HandshakeClosed)
    assert "unknown export" in event.reason


def test_export_name_old_style_reply_with_zeroes() -> None:
    flags = struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE)
    out, event = machine().receive_data(flags + option(p.Opt.EXPORT_NAME, b"portalbd"))
    assert isinstance(event, p.TransmissionReady)
    assert out[:10] == struct.pack(">QH", EXPORT.size, EXPORT.flags)
    assert out[10:] == bytes(124)


def test_list_and_abort() -> None:
    out, event = machine().receive_data(FLAGS + option(p.Opt.LIST) + option(p.Opt.ABORT))
    got = replies(out)
    assert got[0][1] == p.Rep.SERVER and got[0][2] == struct.pack(">I", 8) + b"portalbd"
    assert got[1][1] == p.Rep.ACK and got[2][1] == p.Rep.ACK
    assert isinstance(event, p.HandshakeClosed)


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body


def test_meta_context_needs_structured_replies() -> None:
    out, _ = machine().receive_data(
        FLAGS + option(p.Opt.SET_META_CONTEXT, meta_payload("", "base:allocation"))
    )
    assert replies(out)[0][1] == p.Rep.ERR_INVALID


def test_meta_context_base_allocation() -> None:
    m = machine()
    out, _ = m.receive_data(
        FLAGS
        + option(p.Opt.STRUCTURED_REPLY)
        + option(p.Opt.LIST_META_CONTEXT, meta_payload("", "base:"))
        + option(p.Opt.SET_META_CONTEXT, meta_payload("", "base:allocation", "qemu:dirty"))
    )
    got = replies(out)
    assert [r for _, r, _ in got] == [
        p.Rep.ACK,
        p.Rep.META_CONTEXT,
        p.Rep.ACK,
        p.Rep.META_CONTEXT,
        p.Rep.ACK,
    ]
    assert got[3][2] == struct.pack(">I", p.BASE_ALLOCATION_ID) + b"base:allocation"
    assert m.meta_contexts == ("base:allocation",)


def test_truncated_info_payload_is_invalid_not_fatal() -> None:
    m = machine()
    out, event = m.receive_data(FLAGS + option(p.Opt.GO, b"\x00\x00\x00\x09abc"))
    assert event is None
    assert replies(out)[0][1] == p.Rep.ERR_INVALID


def test_bad_magic_and_bad_flags_close() -> None:
    _, event = machine().receive_data(FLAGS + b"\x00" * 16)
    assert isinstance(event, p.HandshakeClosed) and "magic" in event.reason
    _, event = machine().receive_data(struct.pack(">I", 0x80))
    assert isinstance(event, p.HandshakeClosed)


def test_oversized_option_closes() -> None:
    _, event = machine().receive_data(
        FLAGS + p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.GO, 10 * 1024 * 1024)
    )
    assert isinstance(event, p.HandshakeClosed)


def test_refusal_reports_policy() -> None:
    m = p.ServerHandshake(exports=[EXPORT], default_export="portalbd", refusal="too many")
    out, event = m.receive_data(FLAGS + option(p.Opt.GO, info_payload("")))
    assert event is None
    assert replies(out)[0][1] == p.Rep.ERR_POLICY and b"too many" in replies(out)[0][2]


def tls_machine(mode: p.TlsMode) -> p.ServerHandshake:
    return p.ServerHandshake(exports=[EXPORT], default_export="portalbd", tls=mode)


def test_starttls_is_acknowledged_then_options_go_on_over_tls_from_scratch() -> None:
    m = tls_machine(p.TlsMode.REQUIRE)
    out, event = m.receive_data(FLAGS + option(p.Opt.STRUCTURED_REPLY) + option(p.Opt.STARTTLS))
    # Structured replies asked for in plain text are refused, then forgotten.
    assert [r for _, r, _ in replies(out)] == [p.Rep.ERR_TLS_REQD, p.Rep.ACK]
    assert b"TLS is required" in replies(out)[0][2]
    assert isinstance(event, p.StartTls) and m.state is p.HandshakeState.STARTING_TLS
    with pytest.raises(p.ProtocolError, match="TLS handshake runs"):
        m.receive_data(b"x")
    m.tls_started()
    assert m.tls_active and not m.structured_replies
    out, event = m.receive_data(option(p.Opt.STARTTLS) + option(p.Opt.GO, info_payload("")))
    got = replies(out)
    assert got[0][1] == p.Rep.ERR_INVALID and b"already on" in got[0][2]
    assert got[-1][1] == p.Rep.ACK
    assert isinstance(event, p.TransmissionReady) and not event.structured_replies


def test_require_mode_refuses_every_option_but_starttls_and_abort() -> None:
    m = tls_machine(p.TlsMode.REQUIRE)
    out, event = m.receive_data(
        FLAGS
        + option(p.Opt.LIST)
        + option(p.Opt.INFO, info_payload(""))
        + option(p.Opt.GO, info_payload(""))
        + option(99)
        + option(p.Opt.ABORT)
    )
    assert [r for _, r, _ in replies(out)] == [p.Rep.ERR_TLS_REQD] * 4 + [p.Rep.ACK]
    assert isinstance(event, p.HandshakeClosed) and m.tls_refused == 4


def test_require_mode_closes_on_export_name_without_tls() -> None:
    out, event = tls_machine(p.TlsMode.REQUIRE).receive_data(
        FLAGS + option(p.Opt.EXPORT_NAME, b"portalbd")
    )
    assert out == b""
    assert isinstance(event, p.HandshakeClosed) and "TLS, which is required" in event.reason


def test_allow_mode_serves_plain_and_tls_alike() -> None:
    _, event = tls_machine(p.TlsMode.ALLOW).receive_data(FLAGS + option(p.Opt.GO, info_payload("")))
    assert isinstance(event, p.TransmissionReady)
    m = tls_machine(p.TlsMode.ALLOW)
    out, event = m.receive_data(FLAGS + option(p.Opt.STARTTLS))
    assert replies(out) == [(p.Opt.STARTTLS, p.Rep.ACK, b"")] and isinstance(event, p.StartTls)
    m.tls_started()
    _, event = m.receive_data(option(p.Opt.EXPORT_NAME, b"portalbd"))
    assert isinstance(event, p.TransmissionReady)


def test_starttls_with_a_payload_or_bytes_behind_it_is_refused() -> None:
    m = tls_machine(p.TlsMode.REQUIRE)
    out, event = m.receive_data(FLAGS + option(p.Opt.STARTTLS, b"junk"))
    assert event is None and replies(out)[0][1] == p.Rep.ERR_INVALID
    # A client must wait for the ACK; one that does not is dropped unanswered.
    out, event = m.receive_data(option(p.Opt.STARTTLS) + b"\x16\x03\x01")
    assert out == b""
    assert isinstance(event, p.HandshakeClosed) and "after STARTTLS" in event.reason


def test_tls_started_without_starttls_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="without an acknowledged STARTTLS"):
        tls_machine(p.TlsMode.ALLOW).tls_started()


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length", "expected"),
    [
        (p.Cmd.READ, 0, 0, 4096, p.Err.OK),
        (p.Cmd.READ, 0, (1 << 30) - 1, 2, p.Err.EINVAL),
        (p.Cmd.WRITE, 0, (1 << 30) - 1, 2, p.Err.ENOSPC),
        (p.Cmd.WRITE, 0, 0, 65 * 1024 * 1024, p.Err.EINVAL),
        (p.Cmd.READ, 0, 0, 65 * 1024 * 1024, p.Err.EOVERFLOW),
        (p.Cmd.READ, p.CMD_FLAG_FUA, 0, 1, p.Err.EINVAL),
        (p.Cmd.WRITE, p.CMD_FLAG_FUA, 0, 1, p.Err.OK),
        (p.Cmd.WRITE_ZEROES, p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO, 0, 1, p.Err.OK),
        (p.Cmd.TRIM, 0, 1 << 30, 1, p.Err.ENOSPC),
        (p.Cmd.FLUSH, 0, 0, 0, p.Err.OK),
        (42, 0, 0, 0, p.Err.EINVAL),
        (p.Cmd.RESIZE, 0, 0, 0, p.Err.EINVAL),
    ],
)
def test_check_request(command: int, flags: int, offset: int, length: int, expected: int) -> None:
    request = p.Request(flags=flags, command=command, handle=1, offset=offset, length=length)
    assert p.check_request(request, 1 << 30) == expected


def test_request_roundtrip_and_bad_magic() -> None:
    raw = p.encode_request(p.Cmd.WRITE, 0xDEADBEEF, 4096, 512, p.CMD_FLAG_FUA)
    assert p.decode_request(raw) == p.Request(
        flags=p.CMD_FLAG_FUA, command=p.Cmd.WRITE, handle=0xDEADBEEF, offset=4096, length=512
    )
    with pytest.raises(p.ProtocolError, match="magic"):
        p.decode_request(b"\x00" * 28)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_handshake_never_escapes(data: bytes, chunk: int) -> None:
    """Any input either makes progress or ends the handshake; nothing else escapes."""
    m = machine()
    for i in range(0, len(data), chunk):
        try:
            _, event = m.receive_data(data[i : i + chunk])
        except p.ProtocolError:
            return
        if event is not None:
            return


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                option(p.Opt.STRUCTURED_REPLY),
                option(p.Opt.LIST),
                option(p.Opt.INFO, info_payload("portalbd", 0, 1, 2, 3)),
                option(p.Opt.LIST_META_CONTEXT, meta_payload("", "base:")),
                option(77, b"xyz"),
            ]
        ),
        max_size=6,
    )
)
def test_fuzz_valid_option_sequences_end_in_transmission(options: list[bytes]) -> None:
    m = machine()
    stream = FLAGS + b"".join(options) + option(p.Opt.GO, info_payload(""))
    _, event = m.receive_data(stream)
    assert isinstance(event, p.TransmissionReady)


# --- the transmission phase as the server decodes it ------------------------------------


def decoder(*, read_only: bool = False) -> p.RequestDecoder:
    return p.RequestDecoder(export_size=EXPORT.size, read_only=read_only)


def events(d: p.RequestDecoder) -> list[p.Request | p.PayloadAhead]:
    out: list[p.Request | p.PayloadAhead] = []
    while (event := d.next_event()) is not p.NEED_DATA:
        out.append(event)
    return out


def test_read_only_export_refuses_every_change_in_one_place() -> None:
    d = decoder(read_only=True)
    d.receive_data(
        p.encode_request(p.Cmd.WRITE, 1, 0, 4)
        + b"DATA"  # skipped, not parsed as a header
        + p.encode_request(p.Cmd.TRIM, 2, 0, 4096)
        + p.encode_request(p.Cmd.WRITE_ZEROES, 3, 0, 4096)
        + p.encode_request(p.Cmd.READ, 4, 0, 4096)
        + p.encode_request(p.Cmd.WRITE, 5, EXPORT.size, 1)  # past the end: that error first
        + b"X"
    )
    got = events(d)
    assert [(r.handle, r.error) for r in got if isinstance(r, p.Request)] == [
        (1, p.Err.EPERM),
        (2, p.Err.EPERM),
        (3, p.Err.EPERM),
        (4, p.Err.OK),
        (5, p.Err.ENOSPC),
    ]
    assert all(r.payload is None for r in got if isinstance(r, p.Request))


def test_whole_write_is_a_view_of_the_bytes_received() -> None:
    d = decoder()
    chunk = (
        p.encode_request(p.Cmd.WRITE, 9, 4096, 5)
        + b"hello"
        + p.encode_request(p.Cmd.FLUSH, 10, 0, 0)
    )
    d.receive_data(chunk)
    write, flush = events(d)
    assert isinstance(write, p.Request) and write.payload is not None
    assert write.payload.obj is chunk and bytes(write.payload) == b"hello"
    assert isinstance(flush, p.Request) and flush.command == p.Cmd.FLUSH
    owned = p.payload_owned(write.payload)  # it pins the chunk: work that outlives it copies
    assert owned is not write.payload and bytes(owned) == b"hello"


def test_payload_still_to_come_is_announced_then_gathered() -> None:
    d = decoder()
    d.receive_data(p.encode_request(p.Cmd.WRITE, 7, 0, 1000) + b"a" * 400)
    (ahead,) = events(d)
    assert isinstance(ahead, p.PayloadAhead) and ahead.request.handle == 7
    assert d.payload_progress == (400, 1000)  # what the stalled-payload log line says
    assert not d.between_requests
    d.receive_data(b"b" * 600)
    (write,) = events(d)
    assert write is ahead.request and write.payload is not None
    assert bytes(write.payload) == b"a" * 400 + b"b" * 600
    assert p.payload_owned(write.payload) is write.payload  # its own buffer already
    assert d.payload_progress is None and d.between_requests


def test_a_caller_that_stops_keeps_the_rest_buffered() -> None:
    d = decoder()
    d.receive_data(
        p.encode_request(p.Cmd.READ, 1, 0, 512) + p.encode_request(p.Cmd.READ, 2, 0, 512)
    )
    first = d.next_event()
    assert isinstance(first, p.Request) and first.handle == 1
    assert d.buffered == p.REQUEST_HEADER_SIZE and d.between_requests
    d.receive_data(p.encode_request(p.Cmd.FLUSH, 3, 0, 0)[:10])  # behind what waits
    assert [r.handle for r in events(d) if isinstance(r, p.Request)] == [2]
    d.receive_data(p.encode_request(p.Cmd.FLUSH, 3, 0, 0)[10:])
    assert [r.handle for r in events(d) if isinstance(r, p.Request)] == [3]


def test_wrong_request_magic_ends_the_stream() -> None:
    d = decoder()
    d.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(p.ProtocolError, match="bad request magic 0xdeadbeef"):
        d.next_event()
    with pytest.raises(p.ProtocolError, match="the request stream has ended"):
        d.next_event()


# --- the client's side ----------------------------------------------------------------


def test_client_handshake_with_export_name_and_zeroes() -> None:
    client = p.ClientHandshake(export_name="portalbd", structured=False, go=False, no_zeroes=False)
    server = machine()
    out, event = client.receive_data(server.greeting())
    assert event is None
    answer, done = server.receive_data(out)
    assert isinstance(done, p.TransmissionReady) and not server.no_zeroes
    _, ready = client.receive_data(answer + b"next")
    assert isinstance(ready, p.ClientReady)
    assert (ready.size, ready.flags, ready.structured_replies) == (EXPORT.size, EXPORT.flags, False)
    assert client.leftover == b"next"


def test_client_handshake_rejects_what_is_not_an_nbd_server() -> None:
    with pytest.raises(p.ProtocolError, match="bad greeting magic"):
        p.ClientHandshake().receive_data(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n")


@pytest.mark.parametrize(
    ("expect", "reply", "message"),
    [
        ((1, p.Cmd.READ, 0, 4), p.simple_reply(2), "reply for unknown handle 2"),
        ((1, p.Cmd.READ, 0, 4), b"\x00" * 16, "bad reply magic 0x0"),
        (
            (1, p.Cmd.READ, 0, 4),
            p.structured_block_status(1, 1, [(4, 0)]),
            "block status answers command 0",
        ),
        (
            (1, p.Cmd.READ, 0, 4),
            p.structured_read_header(1, 8, 4) + b"data",
            "chunk 8+4 outside the request",
        ),
        ((1, p.Cmd.BLOCK_STATUS, 0, 4), p.structured_error(1, 0), "error chunk with error 0"),
    ],
)
def test_reply_decoder_says_what_the_server_got_wrong(
    expect: tuple[int, int, int, int], reply: bytes, message: str
) -> None:
    replies = p.ReplyDecoder()
    replies.expect(*expect)
    replies.receive_data(reply)
    with pytest.raises(p.ProtocolError, match=re.escape(message)):
        replies.next_event()


def test_reply_decoder_reads_error_and_block_status_chunks() -> None:
    replies = p.ReplyDecoder()
    replies.expect(1, p.Cmd.READ, 0, 4096)
    replies.expect(2, p.Cmd.BLOCK_STATUS, 0, 8192)
    replies.receive_data(
        p.structured_error(1, p.Err.EIO, "storage unreachable")
        + p.structured_block_status(2, 1, [(4096, p.STATE_HOLE | p.STATE_ZERO), (4096, 0)])
    )
    error = replies.next_event()
    assert isinstance(error, p.ReplyChunk) and error.done
    assert (error.kind, error.error, error.message) == (
        p.REPLY_TYPE_ERROR,
        p.Err.EIO,
        "storage unreachable",
    )
    status = replies.next_event()
    assert isinstance(status, p.ReplyChunk) and status.context_id == 1
    assert status.extents == ((4096, p.STATE_HOLE | p.STATE_ZERO), (4096, 0))
    assert replies.next_event() is p.NEED_DATA and replies.in_flight == 0
