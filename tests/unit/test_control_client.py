"""The two control clients (blocking and asyncio) fail alike, in the words users see.

Real Unix sockets stand in for broken daemons: missing, stale, not a socket,
silent, hanging up, answering garbage. Every case runs through both clients
and both phrasings (with the socket's path for command lines and logs, short
for the TUI, which shows the path next to each message).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from portalbd.control.async_client import AsyncControlClient
from portalbd.control.client import ControlClient
from portalbd.control.errors import (
    AccessDenied,
    ConnectionLost,
    ControlError,
    DaemonError,
    Messages,
    NotRunning,
    ProtocolError,
    Timeout,
    Unreachable,
)
from portalbd.control.replies import MAX_REPLY

FLAVOURS = ["sync", "async"]
STATUS = b'{"Status": {"pid": 1}}\n'


def ask(
    flavour: str,
    path: Path,
    requests: Sequence[str] = ("status",),
    *,
    timeout: float = 5.0,
    name_socket: bool = True,
) -> list[Any]:
    """Call the named client methods in order on one client; their results."""
    if flavour == "sync":
        with ControlClient(path, timeout, name_socket=name_socket) as client:
            return [getattr(client, name)() for name in requests]

    async def run() -> list[Any]:
        async with AsyncControlClient(path, timeout, name_socket=name_socket) as client:
            return [await getattr(client, name)() for name in requests]

    return asyncio.run(run())


def failure(flavour: str, path: Path, **kwargs: Any) -> ControlError:
    with pytest.raises(ControlError) as caught:
        ask(flavour, path, **kwargs)
    return caught.value


@contextlib.contextmanager
def fake_daemon(path: Path, answers: Sequence[bytes | None]) -> Iterator[list[int]]:
    """Answer the request lines of each connection with ``answers`` in turn.

    ``None`` hangs up; once the answers run out the connection stays open and
    silent. Yields a list that counts connections.
    """
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []
    connections: list[int] = []

    def serve(conn: socket.socket) -> None:
        buffer = b""
        for answer in answers:
            while b"\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            _, _, buffer = buffer.partition(b"\n")
            if answer is None:
                conn.close()
                return
            conn.sendall(answer)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            held.append(conn)
            connections.append(1)
            with contextlib.suppress(OSError):
                serve(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield connections
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


# --- nobody there -----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_missing_socket(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    named = failure(flavour, path)
    assert isinstance(named, NotRunning) and (named.path, named.reason) == (path, "missing")
    assert str(named) == f"control socket {path} does not exist: is the daemon running?"
    short = failure(flavour, path, name_socket=False)
    assert str(short) == "socket not found (daemon not running)"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_stale_socket(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves
    named = failure(flavour, path)
    assert isinstance(named, NotRunning) and named.reason == "stale"
    assert str(named) == (
        f"connection refused on control socket {path}: the socket is stale, "
        "no daemon is running there"
    )
    assert str(failure(flavour, path, name_socket=False)) == (
        "connection refused (daemon not running)"
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("where", ["regular-file", "under-a-file"])
def test_not_a_socket(flavour: str, where: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    path = plain if where == "regular-file" else plain / "control.sock"
    named = failure(flavour, path)
    assert isinstance(named, NotRunning) and named.reason == "not-a-socket"
    assert str(named) == f"{path} is not a control socket"
    assert str(failure(flavour, path, name_socket=False)) == "not a control socket"


# --- something there, but not answering well ---------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_silent_daemon_times_out(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with fake_daemon(path, []):
        named = failure(flavour, path, timeout=0.3)
        assert isinstance(named, Timeout)
        assert str(named) == (
            f"no answer from the daemon on {path} within 0.3s "
            "(it may still be working on the request)"
        )
        short = failure(flavour, path, timeout=0.3, name_socket=False)
        assert str(short) == "no answer within 0.3s"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_daemon_hangs_up(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "closer.sock"
    with fake_daemon(path, [None]):
        named = failure(flavour, path)
        assert isinstance(named, ConnectionLost) and isinstance(named, Unreachable)
        assert str(named) == f"the daemon closed control socket {path}"
        assert str(failure(flavour, path, name_socket=False)) == "connection closed by the daemon"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\n", "reply is not JSON: b'HTTP/1.1 400 Bad Request'"),
        (b'{"Unexpected": 1}\n', "expected Status, got {'Unexpected': 1}"),
        (b'"Ok"\n', "expected Status, got Ok"),
    ],
)
def test_garbage_is_a_protocol_error(
    flavour: str, answer: bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "garbage.sock"
    with fake_daemon(path, [answer]):
        error = failure(flavour, path)
    assert isinstance(error, ProtocolError)
    assert str(error) == message


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_endless_reply_is_cut_off(flavour: str, tmp_path: Path) -> None:
    path = tmp_path / "endless.sock"
    with fake_daemon(path, [b"x" * (MAX_REPLY + 1)]):
        error = failure(flavour, path)
    assert isinstance(error, ProtocolError)
    assert str(error) == f"reply longer than {MAX_REPLY} bytes"


# --- the daemon says no -------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_refusal_keeps_the_connection(flavour: str, tmp_path: Path) -> None:
    """A refusal is an answer: the next request goes on the same connection."""
    path = tmp_path / "refuser.sock"
    with fake_daemon(path, [b'{"Error": "snapshot \'x\' not found"}\n', STATUS]) as connections:
        if flavour == "sync":
            with ControlClient(path) as client:
                with pytest.raises(DaemonError, match=r"^snapshot 'x' not found$"):
                    client.snapshot_get("x")
                assert client.status() == {"pid": 1}
        else:

            async def run() -> None:
                async with AsyncControlClient(path) as client:
                    with pytest.raises(DaemonError, match=r"^snapshot 'x' not found$"):
                        await client.snapshot_get("x")
                    assert await client.status() == {"pid": 1}

            asyncio.run(run())
        assert len(connections) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_raw_returns_the_refusal(flavour: str, tmp_path: Path) -> None:
    """`raw` hands back ``{"Error": ...}`` as is: portalctl --json prints it."""
    path = tmp_path / "raw.sock"
    with fake_daemon(path, [b'{"Error": "no"}\n']):
        if flavour == "sync":
            with ControlClient(path) as client:
                assert client.raw({"SnapshotGet": {"name": "x"}}) == {"Error": "no"}
        else:

            async def run() -> Any:
                async with AsyncControlClient(path) as client:
                    return await client.raw({"SnapshotGet": {"name": "x"}})

            assert asyncio.run(run()) == {"Error": "no"}


# --- connect failures no test can provoke on a shared machine -----------------


@pytest.mark.parametrize(
    ("exc", "kind", "named", "short"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied"),
            AccessDenied,
            "permission denied on control socket /run/x.sock "
            "(run as the daemon's user or a member of its group, or as root)",
            "permission denied on the control socket",
        ),
        (
            BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
            Timeout,
            "timed out connecting to control socket /run/x.sock",
            "timed out connecting",
        ),
        (
            OSError(errno.ENAMETOOLONG, "File name too long"),
            Unreachable,
            "cannot connect to control socket /run/x.sock: File name too long",
            "File name too long",
        ),
    ],
)
def test_connect_failure_words(exc: OSError, kind: type, named: str, short: str) -> None:
    path = Path("/run/x.sock")
    assert isinstance(Messages(path).connect_failed(exc), kind)
    assert str(Messages(path).connect_failed(exc)) == named
    assert str(Messages(path, name_socket=False).connect_failed(exc)) == short
