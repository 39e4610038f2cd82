"""The asyncio NBD server: it moves bytes between sockets and the device.

Each connection is an ``asyncio.Protocol``, not a stream: bytes arrive in
``data_received``, are cut into requests without intermediate copies (write
payloads land directly in their own preallocated buffer), and each request
is either answered on the spot from memory (the common case for cached reads
and buffered writes) or handed to a task. Replies go out as soon as each
request completes, in any order; handles let the client match them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from portalbd.device import Device, DeviceError
from portalbd.nbd import protocol as p
from portalbd.stats import ServerStats

log = logging.getLogger("portalbd.nbd")

MAX_INFLIGHT = 256  # per connection; reading pauses above this
RESUME_INFLIGHT = 128
# A client that has not finished the handshake by then is dropped: handshaking
# connections count against max_connections, so stalled ones must not stay.
HANDSHAKE_TIMEOUT = 10.0


class RequestObserver(Protocol):
    """Sees every completed request (the trace recorder is one)."""

    def request_done(
        self,
        conn_id: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        arrival_ns: int,
        duration_ns: int,
        error: int,
    ) -> None: ...


def _prepare_unix_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class NbdServer:
    """Listeners, connections and the rules shared by all of them."""

    def __init__(
        self,
        device: Device,
        *,
        export_name: str,
        description: str,
        stats: ServerStats,
        max_connections: int,
        read_only: bool = False,
    ) -> None:
        self.device = device
        self.export_name = export_name
        self.description = description
        self.stats = stats
        self.max_connections = max_connections
        self.read_only = read_only
        self.observers: list[RequestObserver] = []
        self.connections: set[NbdConnection] = set()
        self.refusal: str | None = None  # set while a restore runs
        self._servers: list[asyncio.Server] = []
        self._ids = itertools.count(1)
        self.on_fatal: Callable[[BaseException], None] | None = None

    def client_list(self) -> list[dict[str, object]]:
        """Who is connected, for status and the TUI."""
        return [
            {
                "id": conn.id,
                "peer": conn.peer,
                "connected_at": round(conn.connected_at, 3),
                "attached": conn.handshake is None,
                "inflight": len(conn._tasks),
            }
            for conn in sorted(self.connections, key=lambda c: c.id)
        ]

    def attached_clients(self) -> int:
        """Connections past the handshake: the clients that can do I/O."""
        return sum(1 for conn in self.connections if conn.handshake is None)

    def export(self) -> p.ExportInfo:
        return p.ExportInfo(
            name=self.export_name,
            size=self.device.size,
            flags=p.transmission_flags(read_only=self.read_only),
            description=self.description,
            min_block=1,
            preferred_block=self.device.block_size,
            max_block=p.MAX_PAYLOAD,
        )

    def _protocol(self) -> NbdConnection:
        return NbdConnection(self, next(self._ids))

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._protocol, host, port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def listen_unix(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(_prepare_unix_path, path)
        server = await loop.create_unix_server(self._protocol, str(path), backlog=1024)
        os.chmod(path, 0o660)
        self._servers.append(server)

    async def close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def disconnect_all(self, reason: str) -> int:
        """Finish in-flight requests, then close every connection."""
        connections = list(self.connections)
        for conn in connections:
            conn.shutdown(reason)
        for conn in connections:
            await conn.closed
        return len(connections)

    def notify(
        self,
        conn_id: int,
        request: p.Request,
        arrival_ns: int,
        error: int,
    ) -> None:
        duration = time.monotonic_ns() - arrival_ns
        self.stats.request_done(request.command, request.length, duration, error)
        for observer in self.observers:
            observer.request_done(
                conn_id,
                request.command,
                request.flags,
                request.offset,
                request.length,
                arrival_ns,
                duration,
                error,
            )


class NbdConnection(asyncio.Protocol):
    """One client connection: handshake, then pipelined transmission."""

    def __init__(self, server: NbdServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.connected_at = time.time()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handshake: p.ServerHandshake | None = None
        self.structured = False
        self.block_status_ok = False
        self.export_size = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._header = bytearray(p.REQUEST_HEADER_SIZE)
        self._header_fill = 0
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_fill = 0
        self._payload_len = 0
        self._payload_request: p.Request | None = None
        self._payload_arrival = 0
        self._payload_error = 0
        self._reading_paused = False
        self._writing_paused = False
        self._stopping = False
        self._counted = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # --- connection lifecycle -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        server = self.server
        refusal = server.refusal
        if refusal is None and len(server.connections) >= server.max_connections:
            refusal = f"too many connections (max_connections = {server.max_connections})"
        if refusal is not None:
            server.stats.connections_refused += 1
            log.warning("connection refused peer=%s conn=%d reason=%r", self.peer, self.id, refusal)
        else:
            server.connections.add(self)
            server.stats.connections += 1
            server.stats.connections_total += 1
            self._counted = True
        self.handshake = p.ServerHandshake(
            exports=[server.export()], default_export=server.export_name, refusal=refusal
        )
        transport.write(self.handshake.greeting())  # type: ignore[attr-defined]
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.handshake is not None:
            self._abort(f"handshake not finished within {HANDSHAKE_TIMEOUT:g}s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        server = self.server
        if self._counted:
            server.connections.discard(self)
            server.stats.connections -= 1
            self._counted = False
            log.info(
                "client disconnected peer=%s conn=%d%s",
                self.peer,
                self.id,
                f" error={exc}" if exc else "",
            )
        self._payload = None
        self._payload_view = None
        if not self._tasks and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._writing_paused or len(self._tasks) >= MAX_INFLIGHT or self._stopping
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused and len(self._tasks) <= RESUME_INFLIGHT:
            transport.resume_reading()
            self._reading_paused = False

    def _abort(self, reason: str) -> None:
        log.warning("closing connection peer=%s conn=%d: %s", self.peer, self.id, reason)
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self, reason: str) -> None:
        """Stop reading, let in-flight requests finish, then close."""
        self._stopping = True
        log.info("disconnecting peer=%s conn=%d: %s", self.peer, self.id, reason)
        self._update_reading()
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self._tasks:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif not self.closed.done() and not self._counted:
            self.closed.set_result(None)

    # --- bytes in -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        handshake = self.handshake
        if handshake is None:
            self._feed(data)
            return
        try:
            out, event = handshake.receive_data(data)
        except p.ProtocolError as exc:
            self._abort(f"handshake error: {exc}")
            return
        assert self.transport is not None
        if out:
            self.transport.write(out)
        if isinstance(event, p.HandshakeClosed):
            log.info("handshake ended peer=%s conn=%d: %s", self.peer, self.id, event.reason)
            self.transport.close()
        elif isinstance(event, p.TransmissionReady):
            self.handshake = None
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None
            self.structured = event.structured_replies
            self.block_status_ok = p.BASE_ALLOCATION in event.meta_contexts
            self.export_size = event.export.size
            log.info(
                "client connected peer=%s conn=%d export=%s structured=%s",
                self.peer,
                self.id,
                event.export.name,
                self.structured,
            )
            if handshake.leftover:
                self._feed(handshake.leftover)

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        size = len(data)
        header = self._header
        while pos < size:
            if self._payload_len:
                take = min(self._payload_len - self._payload_fill, size - pos)
                if self._payload_view is not None:
                    fill = self._payload_fill
                    self._payload_view[fill : fill + take] = view[pos : pos + take]
                self._payload_fill += take
                pos += take
                if self._payload_fill == self._payload_len:
                    self._payload_complete()
                continue
            if self._header_fill == 0 and size - pos >= p.REQUEST_HEADER_SIZE:
                fields = p.REQUEST_HEADER.unpack_from(view, pos)
                pos += p.REQUEST_HEADER_SIZE
            else:
                take = min(p.REQUEST_HEADER_SIZE - self._header_fill, size - pos)
                header[self._header_fill : self._header_fill + take] = view[pos : pos + take]
                self._header_fill += take
                pos += take
                if self._header_fill < p.REQUEST_HEADER_SIZE:
                    return
                self._header_fill = 0
                fields = p.REQUEST_HEADER.unpack(header)
            magic, flags, command, handle, offset, length = fields
            if magic != p.REQUEST_MAGIC:
                self._abort(f"bad request magic {magic:#x}")
                return
            self._on_request(p.Request(flags, command, handle, offset, length))
            if self.transport is None or self.transport.is_closing():
                return

    def _on_request(self, request: p.Request) -> None:
        arrival = time.monotonic_ns()
        error = p.check_request(request, self.export_size)
        if request.command == p.Cmd.WRITE:
            if self.server.read_only and not error:
                error = p.Err.EPERM
            if request.length:
                # The payload follows; read it (or skip it, on error) first.
                self._payload_len = request.length
                self._payload_fill = 0
                self._payload_request = request
                self._payload_arrival = arrival
                self._payload_error = error
                if error:
                    self._payload = None
                    self._payload_view = None
                else:
                    self._payload = bytearray(request.length)
                    self._payload_view = memoryview(self._payload)
                return
        self._dispatch(request, arrival, error, None)

    def _payload_complete(self) -> None:
        request = self._payload_request
        assert request is not None
        payload = self._payload_view
        self._payload = None
        self._payload_view = None
        self._payload_len = 0
        self._payload_request = None
        self._dispatch(request, self._payload_arrival, self._payload_error, payload)

    # --- requests -------------------------------------------------------------

    def _dispatch(
        self, request: p.Request, arrival: int, error: int, payload: memoryview | None
    ) -> None:
        if error:
            self._reply_error(request, arrival, error, "invalid request")
            return
        device = self.server.device
        command = request.command
        if command == p.Cmd.READ:
            data = device.read_nowait(request.offset, request.length)
            if data is not None:
                self._reply_read(request, arrival, data)
                return
            self._spawn(request, arrival, self._read(request, arrival), reply=False, notify=False)
        elif command == p.Cmd.WRITE:
            data_view = payload if payload is not None else memoryview(b"")
            if request.flags & p.CMD_FLAG_FUA:
                self.server.stats.fua_writes += 1
            elif device.write_nowait(request.offset, data_view):
                self._reply_ok(request, arrival)
                return
            fua = bool(request.flags & p.CMD_FLAG_FUA)
            self._spawn(request, arrival, device.write(request.offset, data_view, fua=fua))
        elif command == p.Cmd.FLUSH:
            self._spawn(request, arrival, device.flush())
        elif command == p.Cmd.TRIM:
            if self.server.read_only:
                self._reply_error(request, arrival, p.Err.EPERM, "read-only export")
                return
            fua = bool(request.flags & p.CMD_FLAG_FUA)
            self._spawn(request, arrival, device.trim(request.offset, request.length, fua=fua))
        elif command == p.Cmd.WRITE_ZEROES:
            if self.server.read_only:
                self._reply_error(request, arrival, p.Err.EPERM, "read-only export")
                return
            self._spawn(
                request,
                arrival,
                device.write_zeroes(
                    request.offset,
                    request.length,
                    fua=bool(request.flags & p.CMD_FLAG_FUA),
                    no_hole=bool(request.flags & p.CMD_FLAG_NO_HOLE),
                ),
            )
        elif command == p.Cmd.CACHE:
            self._spawn(request, arrival, device.cache(request.offset, request.length))
        elif command == p.Cmd.BLOCK_STATUS:
            if not (self.structured and self.block_status_ok):
                self._reply_error(request, arrival, p.Err.EINVAL, "base:allocation not negotiated")
                return
            self._spawn(
                request, arrival, self._block_status(request, arrival), reply=False, notify=False
            )
        elif command == p.Cmd.DISC:
            self.server.notify(self.id, request, arrival, 0)
            self._stopping = True
            self._update_reading()
            self._spawn(request, arrival, self._disconnect(), reply=False, notify=False)
        else:  # unreachable: check_request rejects unknown commands
            self._reply_error(request, arrival, p.Err.EINVAL, "unknown command")

    def _spawn(
        self,
        request: p.Request,
        arrival: int,
        work: Awaitable[None],
        *,
        reply: bool = True,
        notify: bool = True,
    ) -> None:
        task = asyncio.ensure_future(self._run(request, arrival, work, reply, notify))
        self._tasks.add(task)
        stats = self.server.stats
        stats.inflight += 1
        if stats.inflight > stats.inflight_max:
            stats.inflight_max = stats.inflight
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= MAX_INFLIGHT:
            self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.server.stats.inflight -= 1
        if self._reading_paused:
            self._update_reading()
        if self._stopping and not self._tasks:
            self._close_when_idle()
        if (
            not self._tasks
            and (self.transport is None or self.transport.is_closing())
            and not self.closed.done()
            and not self._counted
        ):
            self.closed.set_result(None)

    async def _run(
        self, request: p.Request, arrival: int, work: Awaitable[None], reply: bool, notify: bool
    ) -> None:
        try:
            await work
        except DeviceError as exc:
            self._reply_error(request, arrival, p.Err.EIO, str(exc))
            return
        except Exception as exc:  # a bug: log it, answer EIO, keep serving
            log.exception("request failed conn=%d command=%d", self.id, request.command)
            self._reply_error(request, arrival, p.Err.EIO, f"internal error: {exc}")
            return
        if reply:
            self._reply_ok(request, arrival)
        elif notify:
            self.server.notify(self.id, request, arrival, 0)

    async def _read(self, request: p.Request, arrival: int) -> None:
        data = await self.server.device.read(request.offset, request.length)
        self._reply_read(request, arrival, data)

    async def _block_status(self, request: p.Request, arrival: int) -> None:
        extents = await self.server.device.block_status(request.offset, request.length)
        if request.flags & p.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        if not extents:
            # Nothing known yet (store slow): say one block of data, honestly.
            extents = [(min(request.length, self.server.device.block_size), 0)]
        self._send(p.structured_block_status(request.handle, p.BASE_ALLOCATION_ID, extents))
        self.server.notify(self.id, request, arrival, 0)

    async def _disconnect(self) -> None:
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        try:
            await self.server.device.flush()
        except DeviceError as exc:
            log.error("flush on disconnect failed conn=%d: %s", self.id, exc)
        if self.transport is not None:
            self.transport.close()

    # --- bytes out --------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _reply_ok(self, request: p.Request, arrival: int) -> None:
        self._send(p.simple_reply(request.handle, 0))
        self.server.notify(self.id, request, arrival, 0)

    def _reply_error(self, request: p.Request, arrival: int, error: int, message: str) -> None:
        if self.structured and request.command in (p.Cmd.READ, p.Cmd.BLOCK_STATUS):
            self._send(p.structured_error(request.handle, error, message))
        else:
            self._send(p.simple_reply(request.handle, error))
        self.server.notify(self.id, request, arrival, error)

    def _reply_read(self, request: p.Request, arrival: int, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.structured:
                header = p.structured_read_header(request.handle, request.offset, len(data))
            else:
                header = p.simple_reply(request.handle, 0)
            if len(data) <= 4096:
                transport.write(header + bytes(data))
            else:
                transport.writelines((header, data))
        self.server.notify(self.id, request, arrival, 0)
