"""The control socket: newline-delimited JSON requests, one response each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from portalbd.control import protocol
from portalbd.control.requests import AnyRequest
from portalbd.private import make_shared_dirs

log = logging.getLogger("portalbd.control")

Handler = Callable[[AnyRequest], Awaitable[Any]]


class SocketInUse(RuntimeError):
    """Another live daemon answers on this control socket."""


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_socket_path(path: Path) -> None:
    """Create the directory; replace a stale socket, refuse a live one."""
    make_shared_dirs(path.parent)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    if _socket_is_live(path):
        raise SocketInUse(
            f"another portalbd is already running on control socket {path} "
            "(stop it, or give this instance another --instance or --socket)"
        )
    log.info("removing stale control socket %s", path)
    path.unlink()


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._bound = False  # only a socket we created is ours to remove

    async def start(self) -> None:
        prepare_socket_path(self.path)
        old_umask = os.umask(0o117)  # the socket is born 0660, never world-writable
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self.path), limit=protocol.MAX_LINE + 1, backlog=1024
            )
        finally:
            os.umask(old_umask)
        self._bound = True
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._bound:
            # A daemon refused because another one answers on this path must
            # not delete that daemon's socket on its way out.
            self._bound = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(
                        protocol.encode_response(
                            protocol.error(f"request line longer than {protocol.MAX_LINE} bytes")
                        )
                    )
                    await writer.drain()
                    return  # the rest of that line cannot be trusted
                if not line.strip():
                    continue
                response = await self._answer(line)
                writer.write(protocol.encode_response(response))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, line: bytes) -> Any:
        try:
            request = protocol.parse_request(line)
        except protocol.BadRequest as exc:
            return protocol.error(str(exc))
        except Exception as exc:
            # Whatever a line makes the parser raise, the client gets an answer
            # and the connection lives: an escaping exception would end this
            # connection's task with an error nobody retrieves.
            log.exception("control request line could not be parsed")
            return protocol.error(f"invalid request: {exc}")
        try:
            return await self.handler(request)
        except protocol.BadRequest as exc:
            return protocol.error(str(exc))
        except Exception as exc:
            log.exception("control request %s failed", request.kind)
            return protocol.error(f"{request.kind} failed: {exc}")
