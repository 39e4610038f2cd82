"""NBD over TLS (NBD_OPT_STARTTLS) with real clients: libnbd and nbdinfo.

One daemon requires TLS and client certificates from the test CA, another
allows TLS and plain text alike; clients come with the certificate
directories of tests/support/tls.py (a good client, one without a
certificate, one from a stranger CA, one that does not trust the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from portalbd.control.client import request_once
from portalbd.nbd import protocol as p
from tests.conftest import DaemonFactory
from tests.support import BIN, RunningDaemon, start_daemon
from tests.support.rawnbd import raw, recv_exactly
from tests.support.tls import Certificates

pytestmark = pytest.mark.timeout(120)

BLOCK = 65536


@contextlib.contextmanager
def _daemon(workdir: Path, *args: str) -> Iterator[RunningDaemon]:
    daemon = start_daemon(workdir, *args)
    try:
        yield daemon
    finally:
        if daemon.stop(timeout=30) != 0:
            raise AssertionError(daemon.log_tail())


@pytest.fixture(scope="module")
def required(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[RunningDaemon]:
    """TLS required, client certificates signed by the test CA required."""
    args = ("--tls-certificate", str(certs.server_cert), "--tls-key", str(certs.server_key))
    with _daemon(tmp_path_factory.mktemp("required"), *args, "--tls-ca", str(certs.ca)) as d:
        yield d


@pytest.fixture(scope="module")
def allowed(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[RunningDaemon]:
    """TLS or plain text, no client certificates asked for."""
    args = ("--tls-certificate", str(certs.server_cert), "--tls-key", str(certs.server_key))
    workdir = tmp_path_factory.mktemp("allowed")
    with _daemon(workdir, *args, "--tls", "allow", "--nbd-socket", str(workdir / "nbd.sock")) as d:
        yield d


def tls_uri(daemon: RunningDaemon, certificates: Path) -> str:
    return f"nbds://127.0.0.1:{daemon.port}/?tls-certificates={certificates}"


@contextlib.contextmanager
def client(uri: str) -> Iterator[Any]:
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)  # ?tls-certificates=DIR is a local path
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    try:
        yield handle
    finally:
        with contextlib.suppress(nbd.Error):
            handle.shutdown()
        del handle


def refused(uri: str) -> str:
    """Connect expecting failure; libnbd's error message."""
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)
    with pytest.raises(nbd.Error) as caught:
        handle.connect_uri(uri)
    del handle
    return str(caught.value)


def logged_after(daemon: RunningDaemon, start: int, text: str, timeout: float = 10) -> str:
    """The daemon's log from ``start`` on, once ``text`` is in it (the client may
    see the refusal before the daemon has written its line)."""
    deadline = time.monotonic() + timeout
    while text not in (tail := daemon.log()[start:]):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{tail}"
        time.sleep(0.05)
    return tail


def no_clients(daemon: RunningDaemon, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (clients := daemon.status()["clients"]) != []:
        assert time.monotonic() < deadline, clients
        time.sleep(0.05)


def nbdinfo(uri: str, *, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIBNBD_DEBUG": "1"} if debug else None
    return subprocess.run(
        ["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def test_over_tls_everything_works_as_before(required: RunningDaemon, certs: Certificates) -> None:
    data = os.urandom(2 * BLOCK)
    with client(tls_uri(required, certs.client_dir)) as h:
        assert h.get_tls_negotiated()
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(data, 4 * BLOCK)
        h.pwrite(b"tail", 10 * BLOCK + 7)
        h.flush()
        assert h.pread(2 * BLOCK, 4 * BLOCK) == data
        assert h.pread(4, 10 * BLOCK + 7) == b"tail"
        assert h.pread(BLOCK, 20 * BLOCK) == bytes(BLOCK)  # a hole, as a structured read
        found: list[int] = []

        def extents(context: str, offset: int, entries: list[int], error: Any) -> int:
            found.extend(entries)
            return 0

        h.block_status(8 * BLOCK, 0, extents)
        # holes (flags 3) before the data, then the data (flags 0)
        assert found[0] == 4 * BLOCK and found[1] & 1 and found[2:4] == [2 * BLOCK, 0]
        # multi-conn: a second TLS connection sees what the first flushed
        assert h.can_multi_conn()
        with client(tls_uri(required, certs.client_dir)) as other:
            assert other.pread(2 * BLOCK, 4 * BLOCK) == data
            status = required.status()
        assert status["nbd_tls"] == "require" and status["nbd_tls_client_certificates"]
        assert [c["tls"] for c in status["clients"]] == [True, True]
    shown = subprocess.run(
        [str(BIN / "portalctl"), "--socket", str(required.control_socket), "status"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "TLS:" in shown and "required, client certificates checked" in shown
    info = nbdinfo(tls_uri(required, certs.client_dir))
    assert info.returncode == 0, info.stderr
    document = json.loads(info.stdout)
    assert document["TLS"] is True
    assert document["exports"][0]["export-size"] == 1 << 30
    for shown in (json.dumps(required.status()), required.log()):
        assert "PRIVATE KEY" not in shown and certs.server_key.read_text()[40:80] not in shown


def test_plain_client_is_refused_with_tls_required(
    required: RunningDaemon, certs: Certificates
) -> None:
    assert "Operation not supported" in refused(required.uri)
    result = nbdinfo(required.uri, debug=True)
    assert result.returncode != 0
    # What the server answers every option with, as libnbd reports it.
    assert "server error message: TLS is required: STARTTLS first" in result.stderr
    assert "TLS is required (nbd.tls.mode = require)" in logged_after(
        required, 0, "plain-text client refused"
    )


def test_a_client_without_a_certificate_is_refused(
    required: RunningDaemon, certs: Certificates
) -> None:
    start = len(required.log())
    refused(tls_uri(required, certs.anonymous_dir))
    failure = logged_after(required, start, "TLS handshake failed")
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in failure
    no_clients(required)  # the failed handshake is counted out


def test_wrong_ca_is_refused_both_ways(required: RunningDaemon, certs: Certificates) -> None:
    # A client certificate another CA signed: refused (GnuTLS does not even
    # send it, as the server names the CAs it accepts; either way, no entry).
    start = len(required.log())
    refused(tls_uri(required, certs.stranger_dir))
    assert "certificate" in logged_after(required, start, "TLS handshake failed")
    # A client that does not trust the server's CA refuses the server.
    message = refused(tls_uri(required, certs.wrong_ca_dir))
    assert "certificate" in message.lower() or "verif" in message.lower(), message
    no_clients(required)


def test_allow_mode_serves_tls_and_plain_text(allowed: RunningDaemon, certs: Certificates) -> None:
    with client(tls_uri(allowed, certs.anonymous_dir)) as secure, client(allowed.uri) as plain:
        assert secure.get_tls_negotiated() and not plain.get_tls_negotiated()
        secure.pwrite(b"over tls", 0)
        secure.flush()
        assert plain.pread(8, 0) == b"over tls"
        status = allowed.status()
        assert sorted(c["tls"] for c in status["clients"]) == [False, True]
    assert status["nbd_tls"] == "allow" and not status["nbd_tls_client_certificates"]
    # The Unix listener upgrades the same way (libnbd checks the name "localhost").
    socket_path = status["nbd_socket"]
    unix = f"nbds+unix:///?socket={socket_path}&tls-certificates={certs.anonymous_dir}"
    with client(unix) as secure:
        assert secure.get_tls_negotiated() and secure.pread(8, 0) == b"over tls"


def test_secrets_stay_out_of_logs_status_and_traces(
    daemon_factory: DaemonFactory, certs: Certificates, tmp_path: Path
) -> None:
    trace = tmp_path / "t.jsonl"
    secret = "aws-secret-that-must-stay-hidden"
    daemon = daemon_factory(
        "--tls-certificate", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--trace", str(trace),
        env={"AWS_ACCESS_KEY_ID": "hidden-key-id", "AWS_SECRET_ACCESS_KEY": secret},
    )  # fmt: skip
    with client(tls_uri(daemon, certs.anonymous_dir)) as h:
        h.pwrite(b"x" * 4096, 0)
    status = json.dumps(daemon.status())
    recent = json.dumps(request_once(daemon.control_socket, {"Log": {"lines": 500}}))
    assert "NBD listening" in recent  # the ring the Log request returns, checked too
    assert daemon.stop() == 0
    key_lines = certs.server_key.read_text().splitlines()[1:-1]
    for shown in (status, recent, daemon.log(), trace.read_text()):
        assert secret not in shown and "hidden-key-id" not in shown
        assert "PRIVATE KEY" not in shown and not any(line in shown for line in key_lines)
    assert str(certs.server_key) not in status  # status says the mode, not the files


def _starttls(daemon: RunningDaemon) -> socket.socket:
    """A raw connection that sent STARTTLS and read the ACK: TLS is next."""
    s = raw(daemon)
    recv_exactly(s, p.SERVER_GREETING.size)
    s.sendall(p.CLIENT_FLAGS.pack(p.CLIENT_FIXED_NEWSTYLE) + p.option_request(p.Opt.STARTTLS))
    header = recv_exactly(s, p.OPTION_REPLY_HEADER.size)
    assert p.OPTION_REPLY_HEADER.unpack(header)[1:] == (p.Opt.STARTTLS, p.Rep.ACK, 0)
    return s


def test_garbage_or_silence_instead_of_a_tls_hello_is_dropped(
    required: RunningDaemon, certs: Certificates
) -> None:
    start = len(required.log())
    with _starttls(required) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 20)
        assert s.recv(100) == b""  # closed, nothing in plain text
    assert "TLS handshake failed" in logged_after(required, start, "TLS handshake failed")
    # A client that stops after the ACK is dropped by the handshake deadline (3 s).
    began = time.monotonic()
    with _starttls(required) as s:
        s.settimeout(10)
        assert s.recv(100) == b""
    assert time.monotonic() - began < 6
    no_clients(required)
