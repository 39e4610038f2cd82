"""A small asyncio client for the control socket, built so the UI can never hang on it.

Every request has a deadline. Failures are sorted into the three things the
operator needs to tell apart: nothing is listening (`Unreachable`), something
is listening but did not answer in time (`Unresponsive`), or the daemon
answered with an error (`DaemonError`, whose text is the daemon's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from tui.model import Snapshot, Status

MAX_LINE = 16 * 1024 * 1024  # SnapshotList replies can be long; requests stay small


class ControlError(Exception):
    """Base of every failure a control request can end in."""


class Unreachable(ControlError):
    """No daemon listens on the socket (missing file, refused, permission)."""


class Unresponsive(ControlError):
    """The daemon accepted the request but did not answer before the deadline."""


class DaemonError(ControlError):
    """The daemon replied `{"Error": ...}`; the message is meant for people."""


class ProtocolError(ControlError):
    """The reply was not what the protocol documents."""


class ControlClient:
    """One connection to one daemon, reopened after any failure.

    Requests on a connection are answered in order, so a lock keeps two
    concurrent callers from reading each other's reply. Long operations
    (restore) should use their own client so status polling is not queued
    behind them.
    """

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    def _drop(self) -> None:
        """Forget the connection: after a failure its next line may be a stale reply."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(self, request: Any, within: float) -> Any:
        """Send one request and return the decoded reply, or raise a ControlError."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._roundtrip(request), within)
            except TimeoutError:
                self._drop()
                raise Unresponsive(f"no answer within {within:g}s") from None
            except DaemonError:
                raise  # the connection is still in step
            except ControlError:
                self._drop()
                raise
            except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
                self._drop()
                raise Unreachable(_describe(exc)) from None
            except ValueError as exc:  # a reply line longer than MAX_LINE
                self._drop()
                raise ProtocolError(str(exc)) from None
            except asyncio.CancelledError:
                self._drop()
                raise

    async def _roundtrip(self, request: Any) -> Any:
        if self._writer is None or self._reader is None:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.socket), limit=MAX_LINE
                )
            except OSError as exc:
                raise Unreachable(_describe(exc)) from None
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        line = await self._reader.readline()
        if not line.endswith(b"\n"):
            raise Unreachable("connection closed by the daemon")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProtocolError(f"reply is not JSON: {line[:80]!r}") from None
        if isinstance(reply, dict) and "Error" in reply:
            raise DaemonError(str(reply["Error"]))
        return reply

    async def status(self, within: float) -> Status:
        body = _expect(await self.request("Status", within), "Status", dict)
        return Status.from_json(body)

    async def snapshot_list(self, within: float) -> list[Snapshot]:
        body = _expect(await self.request("SnapshotList", within), "SnapshotList", list)
        return [Snapshot.from_json(s) for s in body if isinstance(s, dict)]

    async def snapshot_create(self, name: str, within: float) -> Snapshot:
        reply = await self.request({"SnapshotCreate": {"name": name}}, within)
        return Snapshot.from_json(_expect(reply, "Snapshot", dict))

    async def snapshot_delete(self, name: str, within: float) -> None:
        _expect_ok(await self.request({"SnapshotDelete": {"name": name}}, within))

    async def snapshot_restore(self, name: str, force: bool, within: float) -> None:
        request = {"SnapshotRestore": {"name": name, "force": force}}
        _expect_ok(await self.request(request, within))


def _expect(reply: Any, tag: str, kind: type) -> Any:
    if isinstance(reply, dict) and isinstance(reply.get(tag), kind):
        return reply[tag]
    raise ProtocolError(f"expected {tag}, got {str(reply)[:80]}")


def _expect_ok(reply: Any) -> None:
    if reply != "Ok":
        raise ProtocolError(f"expected Ok, got {str(reply)[:80]}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "socket not found (daemon not running)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (daemon not running)"
    if isinstance(exc, PermissionError):
        return "permission denied on the control socket"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return "connection closed by the daemon"
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
