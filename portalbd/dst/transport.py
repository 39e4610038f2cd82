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
    future: asyncio.Future[Reply]
    data: bytearray = field(default_factory=bytearray)
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0


class SimClient:
    """A minimal NBD client over a :class:`LoopbackTransport`.

    The protocol is the codec's (:class:`~portalbd.nbd.protocol.ClientHandshake`,
    :class:`~portalbd.nbd.protocol.ReplyDecoder`); what is left here is
    moving bytes and matching replies to futures. Anything the server sends
    that breaks the protocol fails the client with the codec's reason.
    """

    def __init__(self, transport: LoopbackTransport, name: str) -> None:
        self.transport = transport
        self.name = name
        self.structured = False
        self.block_status = False
        self.size = 0
        self._replies = p.ReplyDecoder()
        self._handles = 0
        self._pending: dict[int, _Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self.failure: str | None = None

    async def _receive(self) -> bytes:
        """The server's next bytes, once there are some."""
        transport = self.transport
        while not transport.outbox:
            if transport.lost:
                raise ConnectionClosed(f"{self.name}: closed by the server")
            transport.readable.clear()
            await transport.readable.wait()
        data = bytes(transport.outbox)
        transport.outbox.clear()
        return data

    async def handshake(self, *, structured: bool, meta: bool, go: bool, export: str) -> None:
        handshake = p.ClientHandshake(
            export_name=export,
            structured=structured,
            meta_contexts=(p.BASE_ALLOCATION,) if meta else (),
            go=go,
        )
        event: p.ClientReady | p.ClientRefused | None = None
        while event is None:
            data = await self._receive()
            try:
                out, event = handshake.receive_data(data)
            except p.ProtocolError as exc:
                raise AssertionError(f"{self.name}: {exc}") from exc
            if out:
                self.transport.send(out)
        refusals = (event.refusal,) if isinstance(event, p.ClientRefused) else event.refusals
        if refusals:
            refused = refusals[0]
            raise AssertionError(
                f"{self.name}: option {refused.option} refused: {refused.message!r}"
            )
        assert isinstance(event, p.ClientReady)
        self.structured = event.structured_replies
        self.block_status = bool(event.meta_contexts)
        self.size = event.size
        self._replies.receive_data(handshake.leftover)
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    def request(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes | None = None
    ) -> asyncio.Future[Reply]:
        self._handles += 1
        handle = self._handles
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[handle] = _Pending(future)
        self.transport.send(
            self._replies.request(command, handle, offset, length, flags, data or b"")
        )
        return future

    async def _read_replies(self) -> None:
        replies = self._replies
        try:
            while True:
                event = replies.next_event()
                if event is p.NEED_DATA:
                    replies.receive_data(await self._receive())
                else:
                    self._reply(event)
        except ConnectionClosed as exc:
            self._fail_all(exc)
        except p.ProtocolError as exc:
            self.failure = f"{self.name}: {exc}"
            self._fail_all(exc)
        except AssertionError as exc:
            self.failure = str(exc)
            self._fail_all(exc)

    def _reply(self, event: p.SimpleReply | p.ReplyChunk) -> None:
        pending = self._pending[event.handle]  # the codec knows every handle sent
        if isinstance(event, p.SimpleReply):
            del self._pending[event.handle]
            pending.future.set_result(Reply(event.error, event.data))
            return
        kind = event.kind
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            pending.data += event.data
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            pending.extents.extend(event.extents)
        elif kind in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            pending.error = event.error
        elif kind != p.REPLY_TYPE_NONE:
            raise AssertionError(f"{self.name}: unexpected chunk type {kind}")
        if event.done:
            del self._pending[event.handle]
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
