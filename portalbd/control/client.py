"""A blocking client for the control socket, for portalctl and scripts.

Failures are sorted by what the operator has to do about them: no daemon
(`NotRunning`: the socket is missing or nobody accepts on it), no access
(`AccessDenied`), no answer in time (`Timeout`), an answer that is not the
protocol (`ProtocolError`), or the daemon's own refusal (`DaemonError`,
whose text the daemon wrote for people). The TUI has its own asyncio client
(`tui/control.py`); this one has no event loop so a CLI starts fast.
"""

from __future__ import annotations

import errno
import json
import socket
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Any

# Replies can be long (a SnapshotList of thousands); requests stay small.
MAX_REPLY = 16 * 1024 * 1024


class ControlError(Exception):
    """Any failure of a control request; the message is meant for people."""


class NotRunning(ControlError):
    """No daemon listens on the socket; ``reason`` is missing, stale or not-a-socket."""

    def __init__(self, message: str, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class AccessDenied(ControlError):
    """The socket exists but this user may not connect to it."""


class Timeout(ControlError):
    """The daemon did not answer before the deadline."""


class ProtocolError(ControlError):
    """The reply was not a response the protocol documents."""


class DaemonError(ControlError):
    """The daemon answered ``{"Error": ...}``."""


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def describe_connect_error(path: Path, exc: OSError) -> ControlError:
    """Turn a failed connect into an error that says what is wrong and where."""
    if isinstance(exc, FileNotFoundError):
        return NotRunning(
            f"control socket {path} does not exist: is the daemon running?", path, "missing"
        )
    if isinstance(exc, ConnectionRefusedError) and not _is_socket(path):
        return NotRunning(f"{path} is not a control socket", path, "not-a-socket")
    if isinstance(exc, ConnectionRefusedError):
        return NotRunning(
            f"connection refused on control socket {path}: the socket is stale, "
            "no daemon is running there",
            path,
            "stale",
        )
    if isinstance(exc, PermissionError):
        return AccessDenied(
            f"permission denied on control socket {path} "
            "(run as the daemon's user or a member of its group, or as root)"
        )
    if exc.errno == errno.ENOTSOCK or exc.errno == errno.ENOTDIR:
        return NotRunning(f"{path} is not a control socket", path, "not-a-socket")
    if isinstance(exc, TimeoutError):
        return Timeout(f"timed out connecting to control socket {path}")
    return ControlError(f"cannot connect to control socket {path}: {exc.strerror or exc}")


class ControlClient:
    """One connection; requests are answered in order on it."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise describe_connect_error(self.path, exc) from None
            self._sock = sock
        return self._sock

    def raw(self, request: Any) -> Any:
        """Send a request, return the decoded response, ``{"Error": ...}`` included."""
        sock = self._connect()
        deadline = time.monotonic() + self.timeout
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ProtocolError(f"the daemon closed control socket {self.path}")
                self._buffer += chunk
                if len(self._buffer) > MAX_REPLY:
                    raise ProtocolError(f"reply longer than {MAX_REPLY} bytes")
        except TimeoutError:
            self.close()  # a late reply would be read as the next one's
            raise Timeout(
                f"no answer from the daemon on {self.path} within {self.timeout:g}s "
                "(it may still be working on the request)"
            ) from None
        except ProtocolError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            self.close()
            raise ProtocolError(f"reply is not JSON: {line[:80]!r}") from None

    def request(self, request: Any) -> Any:
        """Like `raw`, but an ``{"Error": ...}`` reply raises `DaemonError`."""
        reply = self.raw(request)
        if isinstance(reply, dict) and "Error" in reply:
            raise DaemonError(str(reply["Error"]))
        return reply

    def _tagged(self, request: Any, tag: str, kind: type) -> Any:
        reply = self.request(request)
        if isinstance(reply, dict) and isinstance(reply.get(tag), kind):
            return reply[tag]
        raise ProtocolError(f"expected {tag}, got {str(reply)[:80]}")

    def _ok(self, request: Any) -> None:
        reply = self.request(request)
        if reply != "Ok":
            raise ProtocolError(f"expected Ok, got {str(reply)[:80]}")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._tagged("Status", "Status", dict)
        return result

    def snapshot_create(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._tagged({"SnapshotCreate": {"name": name}}, "Snapshot", dict)
        return result

    def snapshot_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._tagged("SnapshotList", "SnapshotList", list)
        return result

    def snapshot_get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._tagged({"SnapshotGet": {"name": name}}, "Snapshot", dict)
        return result

    def snapshot_delete(self, name: str) -> None:
        self._ok({"SnapshotDelete": {"name": name}})

    def snapshot_restore(self, name: str, force: bool = False) -> None:
        self._ok({"SnapshotRestore": {"name": name, "force": force}})
