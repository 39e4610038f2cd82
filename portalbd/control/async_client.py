"""The asyncio client for the control socket: the TUI and the CSI driver.

The same client as `portalbd.control.client`, for code on an event loop:
the same requests (`calls`), the same replies (`replies`), the same errors
(`errors`). Every request has a deadline, so a wedged daemon can never hang
the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from portalbd.control import calls, replies
from portalbd.control.errors import ControlError, Messages
from portalbd.control.protocol import encode_document

T = TypeVar("T")


class AsyncControlClient:
    """One connection to one daemon, opened on first use and reopened after any failure.

    Requests on a connection are answered in order, so a lock keeps two
    concurrent callers from reading each other's reply. A long operation
    (restore) should use its own client so status polling is not queued
    behind it. ``timeout`` bounds each request, connecting included.
    """

    def __init__(self, path: Path, timeout: float = 30.0, *, name_socket: bool = True) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.messages = Messages(self.path, name_socket)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

    async def raw(self, request: Any) -> Any:
        """Send a request document, return the decoded response, ``{"Error": ...}`` included."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._roundtrip(request)
            except TimeoutError:
                self._drop()
                raise self.messages.no_answer(self.timeout) from None
            except (ControlError, asyncio.CancelledError):
                self._drop()
                raise

    async def _roundtrip(self, request: Any) -> Any:
        if self._reader is None or self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=replies.MAX_REPLY
                )
            except OSError as exc:
                raise self.messages.connect_failed(exc) from None
        try:
            self._writer.write(encode_document(request))
            await self._writer.drain()
            line = await self._reader.readline()
        except ValueError:  # readline's way of saying the line passed the limit
            raise replies.too_long() from None
        except OSError as exc:
            raise self.messages.broken(exc) from None
        if not line.endswith(b"\n"):
            raise self.messages.closed()
        return replies.decode(line[:-1])

    async def request(self, request: Any) -> Any:
        """Like `raw`, but an ``{"Error": ...}`` reply raises `DaemonError`.

        The connection stays open after a refusal: it is still in step.
        """
        reply = await self.raw(request)
        refused = replies.refusal(reply)
        if refused is not None:
            raise refused
        return reply

    async def call(self, call: calls.Call[T]) -> T:
        return call.read(await self.request(call.request))

    async def status(self) -> dict[str, Any]:
        return await self.call(calls.status())

    async def snapshot_create(self, name: str) -> dict[str, Any]:
        return await self.call(calls.snapshot_create(name))

    async def snapshot_list(self) -> list[dict[str, Any]]:
        return await self.call(calls.snapshot_list())

    async def snapshot_get(self, name: str) -> dict[str, Any]:
        return await self.call(calls.snapshot_get(name))

    async def snapshot_delete(self, name: str) -> None:
        await self.call(calls.snapshot_delete(name))

    async def snapshot_restore(self, name: str, force: bool = False) -> None:
        await self.call(calls.snapshot_restore(name, force))

    async def log(self, lines: int = 100, after: int = -1) -> list[dict[str, Any]]:
        """The daemon's recent log records, oldest first (`Log`)."""
        return await self.call(calls.log(lines, after))


async def request_once(path: Path, request: Any, timeout: float = 60.0) -> Any:  # noqa: ASYNC109
    """One request on its own connection; the reply as decoded, ``{"Error": ...}`` included.

    ``timeout`` is the client's own deadline (`asyncio.timeout` inside), the
    same argument the blocking `request_once` takes.
    """
    async with AsyncControlClient(path, timeout) as client:
        return await client.raw(request)
