"""What can go wrong with a control request, sorted by what the operator does about it.

Every client (the blocking one portalctl uses, the asyncio one the TUI and
the CSI driver use) raises these and only these, so a caller tells "no
daemon" from "wedged daemon" from "the daemon said no" the same way
everywhere:

- `Unreachable`: nothing we may talk to answers on the socket.
  `NotRunning` (missing, stale or not a socket), `AccessDenied`, and
  `ConnectionLost` (the daemon hung up or the connection broke mid-request).
- `Timeout`: something accepted the request but did not answer in time.
- `ProtocolError`: the answer is not a response the protocol documents.
- `DaemonError`: the daemon answered ``{"Error": ...}``; its text is for people.

`Messages` words them. A command line names the socket in every message
(the user may not know which one it resolved); a UI that shows each
message next to its socket asks for the short forms instead. Pure: the
clients hand it the OSError they caught.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass
from pathlib import Path


class ControlError(Exception):
    """Any failure of a control request; the message is meant for people."""


class Unreachable(ControlError):
    """No daemon we may talk to answers on the socket."""


class NotRunning(Unreachable):
    """No daemon listens on the socket; ``reason`` is missing, stale or not-a-socket."""

    def __init__(self, message: str, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class AccessDenied(Unreachable):
    """The socket exists but this user may not connect to it."""


class ConnectionLost(Unreachable):
    """The connection closed or broke before the answer came."""


class Timeout(ControlError):
    """The daemon did not answer before the deadline."""


class ProtocolError(ControlError):
    """The reply was not a response the protocol documents."""


class DaemonError(ControlError):
    """The daemon answered ``{"Error": ...}``."""


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Messages:
    """The words for one socket's failures: with the socket's path, or short."""

    path: Path
    name_socket: bool = True

    def _pick(self, long: str, short: str) -> str:
        return long if self.name_socket else short

    def connect_failed(self, exc: OSError) -> ControlError:
        """A failed connect, as an error that says what is wrong (and where)."""
        path = self.path
        if isinstance(exc, FileNotFoundError):
            return NotRunning(
                self._pick(
                    f"control socket {path} does not exist: is the daemon running?",
                    "socket not found (daemon not running)",
                ),
                path,
                "missing",
            )
        refused = isinstance(exc, ConnectionRefusedError)
        if (refused and not is_socket(path)) or exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
            return NotRunning(
                self._pick(f"{path} is not a control socket", "not a control socket"),
                path,
                "not-a-socket",
            )
        if refused:
            return NotRunning(
                self._pick(
                    f"connection refused on control socket {path}: the socket is stale, "
                    "no daemon is running there",
                    "connection refused (daemon not running)",
                ),
                path,
                "stale",
            )
        if isinstance(exc, PermissionError):
            return AccessDenied(
                self._pick(
                    f"permission denied on control socket {path} "
                    "(run as the daemon's user or a member of its group, or as root)",
                    "permission denied on the control socket",
                )
            )
        if isinstance(exc, TimeoutError | BlockingIOError):
            return Timeout(
                self._pick(f"timed out connecting to control socket {path}", "timed out connecting")
            )
        reason = exc.strerror or str(exc)
        return Unreachable(self._pick(f"cannot connect to control socket {path}: {reason}", reason))

    def no_answer(self, seconds: float) -> Timeout:
        return Timeout(
            self._pick(
                f"no answer from the daemon on {self.path} within {seconds:g}s "
                "(it may still be working on the request)",
                f"no answer within {seconds:g}s",
            )
        )

    def closed(self) -> ConnectionLost:
        return ConnectionLost(
            self._pick(
                f"the daemon closed control socket {self.path}", "connection closed by the daemon"
            )
        )

    def broken(self, exc: OSError) -> ConnectionLost:
        """The connection failed mid-request (reset, broken pipe)."""
        reason = exc.strerror or str(exc)
        return ConnectionLost(self._pick(f"control socket {self.path}: {reason}", reason))
