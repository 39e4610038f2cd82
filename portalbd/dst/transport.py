"""An in-process transport and an NBD client that speaks through it.

The server's :class:`~portalbd.nbd.server.NbdConnection` is an
``asyncio.Protocol``; here it is attached to :class:`LoopbackTransport`,
which hands it the client's bytes in seeded, randomly sized chunks (one
chunk per loop iteration, so connections interleave) and collects what it
writes. Pausing, closing and aborting behave as a socket transport's do:
``connection_lost`` arrives on a later loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from portalbd.nbd import protocol as p


class ConnectionClosed(ConnectionError):
    """The server closed the connection before answering."""


class LoopbackTransport(asyncio.Transport):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        rng: random.Random,
        peer: tuple[str, int],
        max_chunk: int,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._rng = rng
        self._peer = peer
        self._max_chunk = max_chunk
        self._inbox = bytearray()
        self._pumping = False
        self._paused = False
        self._closing = False
        self.lost = False
        self.outbox = bytearray()
        self.readable = asyncio.Event()

    # --- the server's side --------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self.outbox += data  # copies, as a socket transport's buffer would
        self.readable.set()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False  # a close is the only end this in-process pipe has

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._connection_lost)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._schedule()

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def _connection_lost(self) -> None:
        self.lost = True
        self.readable.set()
        self._protocol.connection_lost(None)

    # --- the client's side --------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._closing:
            raise ConnectionClosed("connection is closed")
        self._inbox += data
        self._schedule()

    def _schedule(self) -> None:
        if not self._pumping and self._inbox and not self._paused:
            self._pumping = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pumping = False
        if self._closing or self._paused or not self._inbox:
            return
        size = min(len(self._inbox), self._rng.randint(1, self._max_chunk))
        chunk = bytes(self._inbox[:size])
        del self._inbox[:size]
        self._protocol.data_received(chunk)
        self._schedule()

    def crash(self) -> None:
        """The client vanishes: no more bytes either way."""
        self._inbox.clear()
        self.close()


@dataclass(slots=True)
class Reply:
    error: int
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    command: int
    length: int
    future: asyncio.Future[Reply]
    data: bytearray = field(default_factory=bytearray)
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0


class SimClient:
    """A minimal NBD client over a :class:`LoopbackTransport`."""

    def __init__(self, transport: LoopbackTransport, name: str) -> None:
        self.transport = transport
        self.name = name
        self.structured = False
        self.block_status = False
        self.size = 0
        self._buf = bytearray()
        self._handles = 0
        self._pending: dict[int, _Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self.failure: str | None = None

    async def _need(self, n: int) -> None:
        transport = self.transport
        while len(self._buf) < n:
            if transport.outbox:
                self._buf += transport.outbox
                transport.outbox.clear()
                continue
            if transport.lost:
                raise ConnectionClosed(f"{self.name}: closed by the server")
            transport.readable.clear()
            await transport.readable.wait()

    def _take(self, n: int) -> bytes:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    async def handshake(self, *, structured: bool, meta: bool, go: bool, export: str) -> None:
        await self._need(p.SERVER_GREETING.size)
        magic, opt_magic, _flags = p.SERVER_GREETING.unpack(self._take(p.SERVER_GREETING.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise AssertionError(f"{self.name}: bad greeting")
        out = [p.CLIENT_FLAGS.pack(p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES)]
        options = 0
        if structured:
            out.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.STRUCTURED_REPLY, 0))
            options += 1
            if meta:
                name = export.encode()
                query = p.BASE_ALLOCATION.encode()
                body = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query))
                body += query
                out.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.SET_META_CONTEXT, len(body)))
                out.append(body)
                options += 1
        name = export.encode()
        if go:
            body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            out.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.GO, len(body)) + body)
            options += 1
        else:
            out.append(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.EXPORT_NAME, len(name)) + name)
        self.transport.send(b"".join(out))
        finals = 0
        while finals < options:
            await self._need(p.OPTION_REPLY_HEADER.size)
            _m, option, reply, length = p.OPTION_REPLY_HEADER.unpack(
                self._take(p.OPTION_REPLY_HEADER.size)
            )
            await self._need(length)
            payload = self._take(length)
            if reply == p.Rep.ACK or reply & (1 << 31):
                finals += 1
                if reply != p.Rep.ACK:
                    raise AssertionError(f"{self.name}: option {option} refused: {payload!r}")
                if option == p.Opt.STRUCTURED_REPLY:
                    self.structured = True
            elif reply == p.Rep.META_CONTEXT:
                self.block_status = True
            elif reply == p.Rep.INFO and payload[:2] == p.U16.pack(p.Info.EXPORT):
                self.size = p.U64.unpack(payload[2:10])[0]
        if not go:
            await self._need(p.EXPORT_NAME_REPLY.size)
            self.size = p.EXPORT_NAME_REPLY.unpack(self._take(p.EXPORT_NAME_REPLY.size))[0]
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    def request(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes | None = None
    ) -> asyncio.Future[Reply]:
        self._handles += 1
        handle = self._handles
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[handle] = _Pending(command, length, future)
        header = p.encode_request(command, handle, offset, length, flags)
        self.transport.send(header + data if data is not None else header)
        return future

    async def _read_replies(self) -> None:
        try:
            while True:
                await self._need(4)
                magic = p.U32.unpack(self._buf[:4])[0]
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await self._need(p.SIMPLE_REPLY.size)
                    _m, error, handle = p.SIMPLE_REPLY.unpack(self._take(p.SIMPLE_REPLY.size))
                    pending = self._pop(handle)
                    data = b""
                    if pending.command == p.Cmd.READ and error == 0:
                        await self._need(pending.length)
                        data = self._take(pending.length)
                    pending.future.set_result(Reply(error, data))
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    await self._need(p.STRUCTURED_HEADER.size)
                    _m, flags, kind, handle, length = p.STRUCTURED_HEADER.unpack(
                        self._take(p.STRUCTURED_HEADER.size)
                    )
                    await self._need(length)
                    self._chunk(handle, flags, kind, self._take(length))
                else:
                    raise AssertionError(f"{self.name}: bad reply magic {magic:#x}")
        except ConnectionClosed as exc:
            self._fail_all(exc)
        except AssertionError as exc:
            self.failure = str(exc)
            self._fail_all(exc)

    def _pop(self, handle: int) -> _Pending:
        pending = self._pending.pop(handle, None)
        if pending is None:
            raise AssertionError(f"{self.name}: reply for unknown handle {handle}")
        return pending

    def _chunk(self, handle: int, flags: int, kind: int, body: bytes) -> None:
        pending = self._pending.get(handle)
        if pending is None:
            raise AssertionError(f"{self.name}: chunk for unknown handle {handle}")
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            pending.data += body[8:]
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            for i in range(4, len(body), 8):
                pending.extents.append(p.EXTENT.unpack(body[i : i + 8]))
        elif kind in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            pending.error = p.U32.unpack(body[:4])[0]
        elif kind != p.REPLY_TYPE_NONE:
            raise AssertionError(f"{self.name}: unexpected chunk type {kind}")
        if flags & p.REPLY_FLAG_DONE:
            del self._pending[handle]
            pending.future.set_result(Reply(pending.error, bytes(pending.data), pending.extents))

    def _fail_all(self, exc: Exception) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionClosed(str(exc)))
                pending.future.exception()
        self._pending.clear()

    async def disconnect(self) -> None:
        """NBD_CMD_DISC, then wait for the server to close."""
        self.transport.send(p.encode_request(p.Cmd.DISC, 0, 0, 0))
        while not self.transport.lost:
            self.transport.readable.clear()
            await self.transport.readable.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._fail_all(ConnectionClosed("client stopped"))
