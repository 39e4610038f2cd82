"""Golden tests of the control socket's wire format, byte for byte.

Scripts written for the original daemon send these exact lines and parse
these exact answers, so the tests speak raw bytes on a real socket rather
than going through any client library.
"""

from __future__ import annotations

import re
import socket
import stat
import threading
from pathlib import Path

import pytest

from portalbd.control import protocol
from portalbd.control.client import request_once
from portalbd.launch import wait_until
from tests.conftest import DaemonFactory
from tests.support import (
    RunningDaemon,
    Wire,
    free_port,
    run_portalbd,
    wait_for_port,
)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture
def wire(daemon: RunningDaemon) -> Wire:
    return Wire(daemon.control_socket)


def test_snapshot_vocabulary_golden(daemon: RunningDaemon, wire: Wire) -> None:
    assert wire.ask(b'"SnapshotList"\n') == b'{"SnapshotList":[]}\n'
    created = wire.ask(b'{"SnapshotCreate":{"name":"s1"}}\n')
    snap = rb'\{"id":"(' + UUID.encode() + rb')","name":"s1","created_at":(\d+),'
    snap += rb'"generation":1,"size_bytes":0\}'
    match = re.fullmatch(rb'\{"Snapshot":' + snap + rb"\}\n", created)
    assert match, created
    body = created[len(b'{"Snapshot":') : -2]
    assert wire.ask(b'{"SnapshotGet":{"name":"s1"}}\n') == created
    assert wire.ask(b'"SnapshotList"\n') == b'{"SnapshotList":[' + body + b"]}\n"
    assert wire.ask(b'{"SnapshotRestore":{"name":"s1"}}\n') == b'"Ok"\n'
    assert wire.ask(b'{"SnapshotRestore":{"name":"s1","force":true}}\n') == b'"Ok"\n'
    # The restores made generation 3 live; the snapshot still points at 1.
    assert wire.ask(b'{"SnapshotGet":{"name":"s1"}}\n') == created
    assert wire.ask(b'{"SnapshotDelete":{"name":"s1"}}\n') == b'"Ok"\n'
    assert wire.ask(b'{"SnapshotGet":{"name":"s1"}}\n') == (
        b'{"Error":"snapshot \'s1\' not found"}\n'
    )
    assert wire.ask(b'{"SnapshotCreate":{"name":"s1"}}\n').startswith(b'{"Snapshot":{"id":"')
    assert wire.ask(b'{"SnapshotCreate":{"name":"s1"}}\n') == (
        b'{"Error":"snapshot \'s1\' already exists"}\n'
    )


def test_status_golden_prefix(daemon: RunningDaemon, wire: Wire) -> None:
    """The original's four fields come first, in its order; additions follow."""
    line = wire.ask(b'"Status"\n')
    prefix = (
        b'{"Status":{"size_bytes":1073741824,"block_count":16384,"snapshot_count":0,'
        b'"nbd_address":"127.0.0.1:' + str(daemon.port).encode() + b'",'
    )
    assert line.startswith(prefix), line[:200]
    for field in (b'"instance":"t"', b'"version":', b'"uptime_s":', b'"storage_url":'):
        assert field in line
    for stat_field in (b'"connections":', b'"commands":{"read":', b'"latency_us":'):
        assert stat_field in line
    metrics = wire.ask(b'"Metrics"\n')
    assert metrics.startswith(b'{"Metrics":{"connections":')


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b"not json\n", b'{"Error":"invalid JSON: Expecting value: line 1 column 1 (char 0)"}\n'),
        (b"\xff\xfe\n", None),
        (b"[1,2]\n", None),
        (b'{"Status":{},"SnapshotList":{}}\n', None),
        (
            b'"Bogus"\n',
            b'{"Error":"unknown request \'Bogus\' (known: Log, Metrics, SnapshotCreate, '
            b"SnapshotDelete, SnapshotGet, SnapshotList, SnapshotRestore, Status, "
            b'TraceStart, TraceStop)"}\n',
        ),
        (b'{"SnapshotGet":{}}\n', b'{"Error":"SnapshotGet: missing field \'name\'"}\n'),
        (b'{"SnapshotGet":null}\n', b'{"Error":"SnapshotGet: missing field \'name\'"}\n'),
        (b'{"SnapshotGet":"s1"}\n', b'{"Error":"SnapshotGet: fields must be an object"}\n'),
        (
            b'{"SnapshotCreate":{"name":1}}\n',
            b'{"Error":"SnapshotCreate: field \'name\' must be a str"}\n',
        ),
        (
            b'{"SnapshotRestore":{"name":"a","force":"yes"}}\n',
            b'{"Error":"SnapshotRestore: field \'force\' must be a bool"}\n',
        ),
        (
            b'{"SnapshotGet":{"name":"a","extra":1}}\n',
            b'{"Error":"SnapshotGet: unknown field \'extra\'"}\n',
        ),
        (
            b'{"SnapshotCreate":{"name":"../etc"}}\n',
            b"{\"Error\":\"invalid snapshot name '../etc': use 1-128 letters, digits, '.', "
            b"'_' or '-', not starting with '.' or '-'\"}\n",
        ),
        (
            b'{"SnapshotCreate":{"name":"' + b"x" * 129 + b'"}}\n',
            None,
        ),
    ],
)
def test_malformed_line_gets_error_and_connection_stays_open(
    wire: Wire, line: bytes, answer: bytes | None
) -> None:
    got = wire.ask(line)
    if answer is None:
        assert got.startswith(b'{"Error":"') and got.endswith(b'"}\n'), got
    else:
        assert got == answer
    assert wire.ask(b'"SnapshotList"\n') == b'{"SnapshotList":[]}\n'


def test_pipelined_requests_answered_in_order(wire: Wire) -> None:
    wire.send(
        b'{"SnapshotCreate":{"name":"a"}}\n\n   \n"SnapshotList"\n{"SnapshotGet":{"name":"b"}}\n'
    )
    assert wire.line().startswith(b'{"Snapshot":{"id":')
    assert wire.line().startswith(b'{"SnapshotList":[{"id":')
    assert wire.line() == b'{"Error":"snapshot \'b\' not found"}\n'


def test_request_split_across_writes(wire: Wire) -> None:
    for byte in b'"SnapshotList"':
        wire.send(bytes([byte]))
    wire.send(b"\n")
    assert wire.line() == b'{"SnapshotList":[]}\n'


def test_long_but_legal_line_is_accepted(wire: Wire) -> None:
    padded = b" " * (protocol.MAX_LINE - 100) + b'"SnapshotList"\n'
    assert wire.ask(padded) == b'{"SnapshotList":[]}\n'


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_line_refused_without_buffering_it(daemon: RunningDaemon) -> None:
    """64 MiB with no newline: the daemon answers an error and hangs up.

    It must stop reading at the limit, so its memory does not grow by
    anything like what was sent (the bound is loose on purpose: this is
    about not buffering the line, not a memory benchmark).
    """
    before = rss_kib(daemon.process.pid)
    wire = Wire(daemon.control_socket)
    sent = 0
    chunk = b"x" * (1 << 20)

    def flood() -> None:
        nonlocal sent
        try:
            while sent < 64 << 20:
                wire.sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the daemon hung up: what we want

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    answer = wire.line()
    assert answer == b'{"Error":"request line longer than 65536 bytes"}\n'
    thread.join(30)
    with pytest.raises((EOFError, OSError)):
        wire.line()
    wire.close()
    assert sent < 64 << 20, "the daemon kept reading the whole flood"
    growth_mib = (rss_kib(daemon.process.pid) - before) / 1024
    assert growth_mib < 32, f"daemon RSS grew {growth_mib:.0f} MiB"
    # The daemon is fine and serves new connections.
    fresh = Wire(daemon.control_socket)
    assert fresh.ask(b'"SnapshotList"\n') == b'{"SnapshotList":[]}\n'
    fresh.close()


def test_socket_mode_0660(daemon: RunningDaemon) -> None:
    mode = daemon.control_socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_socket_directory_created(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "control.sock"
    daemon = daemon_factory("--socket", str(path), wait=False)
    wait_for_port(daemon.port, daemon.process)
    wait_until(path.exists, daemon.process, 10, "the control socket")
    assert request_once(path, "SnapshotList") == {"SnapshotList": []}
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    daemon.stop()
    assert not path.exists(), "a clean stop removes its socket"


def test_stale_socket_is_replaced(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "stale" / "control.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # left behind, nobody listening: like after a SIGKILL
    daemon = daemon_factory(workdir=path.parent, instance="control")
    assert daemon.control_socket == path
    assert daemon.control("SnapshotList") == {"SnapshotList": []}
    assert f"removing stale control socket {path}" in daemon.log()


def test_stale_socket_after_sigkill_is_replaced(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    first = daemon_factory(instance="k")
    first.kill()
    assert first.control_socket.exists()
    second = daemon_factory(instance="k")
    assert second.control("SnapshotList") == {"SnapshotList": []}


def test_live_socket_refused(daemon: RunningDaemon) -> None:
    result = run_portalbd(
        "--instance",
        "other",
        "--nbd-address",
        f"127.0.0.1:{free_port()}",
        "--socket",
        str(daemon.control_socket),
    )
    assert result.returncode != 0
    assert (
        f"another portalbd is already running on control socket {daemon.control_socket} "
        "(stop it, or give this instance another --instance or --socket)"
    ) in result.stderr + result.stdout
    # The running daemon kept its socket.
    assert daemon.control("SnapshotList") == {"SnapshotList": []}


def test_regular_file_at_socket_path_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    result = run_portalbd(
        "--nbd-address", f"127.0.0.1:{free_port()}", "--socket", str(path), "--size-bytes=1048576"
    )
    assert result.returncode != 0
    assert f"{path} exists and is not a socket; refusing to replace it" in (
        result.stderr + result.stdout
    )
    assert path.read_text() == "precious"


# --- the pure codec -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "args", "wire_bytes"),
    [
        ("Status", {}, b'"Status"\n'),
        ("SnapshotList", {}, b'"SnapshotList"\n'),
        ("SnapshotCreate", {"name": "s1"}, b'{"SnapshotCreate": {"name": "s1"}}\n'),
        (
            "SnapshotRestore",
            {"name": "s1", "force": True},
            b'{"SnapshotRestore": {"name": "s1", "force": true}}\n',
        ),
    ],
)
def test_encode_parse_roundtrip(kind: str, args: dict[str, object], wire_bytes: bytes) -> None:
    assert protocol.encode_request(kind, **args) == wire_bytes
    assert protocol.parse_request(wire_bytes) == protocol.Request(kind, args)


def test_response_encoding_is_compact() -> None:
    assert protocol.encode_response("Ok") == b'"Ok"\n'
    assert protocol.encode_response(protocol.error("no")) == b'{"Error":"no"}\n'
