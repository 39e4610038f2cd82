"""The simulation: a seeded workload against a real Instance, with crashes and faults.

Everything real runs: the NBD handshake and transmission code, the
write-back device, SlateDB on an in-memory object store, snapshots and
restores through the control handler. Only the sockets are replaced, by
:class:`~portalbd.dst.transport.LoopbackTransport`. A crash abandons the
instance (its tasks are cancelled, its SlateDB handles are never shut down,
its buffers are dropped) and opens a new one on the same object store: only
what SlateDB really made durable is there to be found.

With a fault kind (:mod:`portalbd.dst.faults`) the data databases also see
object-store errors, latency, an outage or a full disk. A request that
fails may or may not have taken effect: the simulation reads its range back
to learn which, and the disk must hold one or the other. Reads may fail
while the store does, but never return older data than was acknowledged;
once the faults end, FLUSH must succeed within :data:`RECOVERY_S` and the
disk must verify, before and after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portalbd.config import Config
from portalbd.control import protocol as cp
from portalbd.dst.faults import ENOSPC_TIMEOUT_MS, FAULT_TIMEOUT_MS, FaultPlan, kind_for
from portalbd.dst.oracle import DiskOracle
from portalbd.dst.transport import LoopbackTransport, Reply, SimClient
from portalbd.instance import Instance
from portalbd.nbd import protocol as p
from portalbd.nbd.server import NbdConnection
from portalbd.store import instance as store_instance
from portalbd.store.slate import resolve_object_store

log = logging.getLogger("portalbd.dst")

EXPORT = "dst"
STEP_TIMEOUT = 30.0  # seconds; a step that takes longer is reported as a hang
RECOVERY_S = 10.0  # after the faults end, FLUSH must succeed within this
RETRY_PAUSE_S = 0.02  # between attempts of a read or FLUSH that may fail


class SimulationFailure(AssertionError):
    def __init__(self, seed: int, step: int, message: str, history: list[str]) -> None:
        super().__init__(f"seed {seed} step {step}: {message}")
        self.seed = seed
        self.step = step
        self.message = message
        self.history = history


@dataclass(slots=True)
class Stats:
    steps: int = 0
    rounds: int = 0
    reads: int = 0
    writes: int = 0
    fua_writes: int = 0
    trims: int = 0
    zeroes: int = 0
    flushes: int = 0
    block_statuses: int = 0
    invalid: int = 0
    snapshots: int = 0
    deletes: int = 0
    restores: int = 0
    crashes: int = 0
    crashes_mid_io: int = 0
    crashes_mid_admin: int = 0
    reconnects: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0
    faults: str = "none"
    injected: int = 0  # faults the plan injected (delays and stalls included)
    injected_by: str = "-"
    failed_requests: int = 0  # requests answered with an error the faults allow
    took_effect: int = 0  # failed writes that turned out applied
    recoveries: int = 0  # FLUSH succeeding again after the faults ended

    def summary(self) -> str:
        return " ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)


@dataclass(slots=True)
class _Op:
    kind: str  # read write trim zero flush status invalid
    conn: int
    offset: int = 0
    length: int = 0
    fua: bool = False
    data: bytes = b""
    flags: int = 0
    command: int = 0


PAGE = 4096  # the page size of format 2: writes of whole pages become deltas


@dataclass(slots=True)
class SimConfig:
    seed: int
    steps: int
    block_size: int = 4096
    blocks: int = 48
    tail: int = 1000  # the last block is partial: size is not a block multiple
    connections: int = 3
    max_chunk: int = 5000
    flush_interval_ms: int = 0
    dirty_blocks: int | None = None  # None: chosen by the seed
    cache_blocks: int | None = None  # None: chosen by the seed (0 disables the cache)
    faults: str = "none"  # a kind of portalbd.dst.faults.KINDS, or "seed"
    encrypted: bool = False  # an encrypted disk (format 3), its key drawn from the seed


@contextlib.contextmanager
def _shared_store(object_store: Any) -> Iterator[None]:
    """Make the instance open our in-memory object store, not a fresh one.

    ``memory:///`` resolves to a new empty store each time; a crash test
    needs the reopened instance to find the old one's objects.
    """
    original = getattr(store_instance, "resolve_object_store")  # noqa: B009
    setattr(store_instance, "resolve_object_store", lambda *args, **kwargs: object_store)  # noqa: B010
    try:
        yield
    finally:
        setattr(store_instance, "resolve_object_store", original)  # noqa: B010


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel until they are done: Python 3.11's ``wait_for`` swallows a
    cancellation that arrives just as its inner future completes (the
    device's writeback loop sits in one), so a single cancel can be lost."""
    while tasks:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=0.05)
        tasks = [task for task in tasks if not task.done()]


@dataclass(slots=True)
class _Conn:
    client: SimClient
    transport: LoopbackTransport


@dataclass
class Simulation:
    cfg: SimConfig
    stats: Stats = field(default_factory=Stats)
    history: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.rng = random.Random(cfg.seed)
        self.dirty_blocks = cfg.dirty_blocks or self.rng.choice([4, 8, 16, 64])
        self.cache_blocks = (
            cfg.cache_blocks if cfg.cache_blocks is not None else self.rng.choice([0, 2, 8, 64])
        )
        self.size = cfg.blocks * cfg.block_size + cfg.tail
        self.oracle = DiskOracle(self.size, cfg.block_size)
        self.snapshots: dict[str, bytes] = {}  # what exists, with its content
        # What the generator picks from: it must not depend on how a crash in
        # the middle of a create or delete turned out, or runs would diverge.
        self.names: set[str] = set()
        self.snapshot_counter = 0
        self.object_store = resolve_object_store("memory:///")
        self.instance: Instance | None = None
        self.abandoned: list[Instance] = []
        self.conns: list[_Conn | None] = []
        self.conn_counter = 0
        self.step = 0
        self.faults = FaultPlan(kind_for(cfg.faults, cfg.seed), cfg.seed)
        # The transports draw their chunk sizes per request sent. Faults add
        # requests (read-backs, retries) that depend on outcomes, so then the
        # transports get their own generator and the workload stays the
        # seed's; without faults they share it, as every old seed did.
        self.transport_rng = (
            random.Random(f"{cfg.seed}:transport") if self.faults.enabled else self.rng
        )
        self.stats.faults = self.faults.kind
        # Its own generator, so the workload stays the seed's with or without it.
        self.encryption_key = (
            random.Random(f"{cfg.seed}:key").randbytes(32) if cfg.encrypted else None
        )
        # Who last wrote each byte, so a failure can name the write it lost.
        self.writers: list[str | None] = [None] * self.size

    # --- plumbing -------------------------------------------------------------

    def fail(self, message: str) -> SimulationFailure:
        return SimulationFailure(self.cfg.seed, self.step, message, self.history[-40:])

    def note(self, text: str) -> None:
        self.history.append(f"[{self.step}] {text}")

    def config(self) -> Config:
        cfg = Config()
        cfg.instance.name = f"dst-{self.cfg.seed}"
        cfg.device.size_bytes = self.size
        cfg.device.block_size = self.cfg.block_size
        cfg.device.dirty_bytes = self.dirty_blocks * self.cfg.block_size
        cfg.device.cache_bytes = self.cache_blocks * self.cfg.block_size
        cfg.nbd.export_name = EXPORT
        cfg.nbd.address = ""
        cfg.lsm.flush_interval_ms = self.cfg.flush_interval_ms
        cfg.lsm.block_cache_size_bytes = 0
        if self.faults.enabled:
            kind = self.faults.kind
            cfg.storage.timeout_ms = ENOSPC_TIMEOUT_MS if kind == "enospc" else FAULT_TIMEOUT_MS
        return cfg

    async def open_instance(self) -> None:
        instance = Instance(
            self.config(),
            Path(f"/nonexistent/dst-{self.cfg.seed}.sock"),
            encryption_key=self.encryption_key,
        )
        with _shared_store(self.object_store), self.faults.paused():
            await instance.open()
        self.instance = instance
        assert instance.device is not None
        if instance.device.size != self.size:
            raise self.fail(f"reopened with size {instance.device.size}, expected {self.size}")
        if (instance.sealer is not None) != self.cfg.encrypted:
            raise self.fail(f"opened with sealer {instance.sealer}, encrypted={self.cfg.encrypted}")

    async def connect(self, slot: int) -> None:
        assert self.instance is not None and self.instance.server is not None
        loop = asyncio.get_running_loop()
        self.conn_counter += 1
        protocol = NbdConnection(self.instance.server, self.conn_counter)
        transport = LoopbackTransport(
            loop, protocol, self.transport_rng, ("sim", self.conn_counter), self.cfg.max_chunk
        )
        protocol.connection_made(transport)
        client = SimClient(transport, f"conn{slot}")
        structured = self.rng.random() < 0.6
        meta = structured and self.rng.random() < 0.8
        go = self.rng.random() < 0.8
        await client.handshake(structured=structured, meta=meta, go=go, export=EXPORT)
        if client.size != self.size:
            raise self.fail(f"handshake says size {client.size}, expected {self.size}")
        conn = _Conn(client, transport)
        while len(self.conns) <= slot:
            self.conns.append(None)
        self.conns[slot] = conn
        self.note(f"connect conn{slot} structured={structured} meta={meta} go={go}")

    async def connect_all(self) -> None:
        for slot in range(self.cfg.connections):
            await self.connect(slot)

    def conn(self, slot: int) -> SimClient:
        conn = self.conns[slot]
        assert conn is not None
        return conn.client

    async def drop_clients(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.transport.crash()
                await conn.client.stop()
        self.conns = [None] * len(self.conns)

    async def crash_instance(self) -> None:
        """Abandon the instance as a SIGKILL would: nothing more reaches storage."""
        instance = self.instance
        assert instance is not None and instance.device is not None
        device = instance.device

        def instance_tasks() -> set[asyncio.Task[Any]]:
            tasks: set[asyncio.Task[Any]] = set()
            if instance.server is not None:
                for conn in list(instance.server.connections):
                    tasks.update(conn._tasks)
            watchdog = getattr(instance, "_watchdog", None)
            tasks.update(t for t in (device._writeback_task, device._flush_runner, watchdog) if t)
            return {task for task in tasks if not task.done()}

        # Collected before the clients go: a connection that closes leaves
        # the server's list, and its request tasks (a FUA write on its way
        # to a flush) would live on as a zombie writer, which no SIGKILLed
        # process is.
        doomed = instance_tasks()
        await self.drop_clients()
        while doomed:
            await _cancel_all(list(doomed))
            doomed = instance_tasks()  # a flush runner started on the way out
        # Keep the handles referenced and never shut them down: a dead
        # process does not say goodbye. Opening again fences them.
        self.abandoned.append(instance)
        self.instance = None
        await self.open_instance()
        await self.connect_all()

    async def read_range(self, offset: int, length: int, what: str) -> bytes:
        """Read, retrying while the faults allow reads to fail."""
        client = self.conn(0)
        deadline = asyncio.get_running_loop().time() + RECOVERY_S
        while True:
            reply = await client.request(p.Cmd.READ, offset, length)
            if not reply.error:
                return reply.data
            if not self.faults.read_errors_allowed():
                raise self.fail(
                    f"{what} at {offset} failed with error {reply.error}{self._storage_state()}"
                )
            self.stats.failed_requests += 1
            if asyncio.get_running_loop().time() > deadline:
                raise self.fail(f"{what} at {offset} still fails after {RECOVERY_S:g}s")
            await asyncio.sleep(RETRY_PAUSE_S)

    async def read_disk(self) -> bytes:
        out = bytearray()
        chunk = 64 * 1024
        for offset in range(0, self.size, chunk):
            out += await self.read_range(offset, min(chunk, self.size - offset), "full read")
        self.stats.bytes_verified += len(out)
        return bytes(out)

    def _storage_state(self) -> str:
        """Why the data database last failed, to tell a bug from a slow machine
        (a call that merely took longer than the storage bound)."""
        store = self.instance.store if self.instance is not None else None
        if store is None or store.data.health == "ok":
            return ""
        return f" (storage: {store.data.health})"

    def blame(self, offset: int) -> str:
        """The acknowledged write whose byte at ``offset`` a read should show."""
        writer = self.writers[offset]
        return f"the acknowledged {writer}" if writer else "no acknowledged write (zeros)"

    def _mismatch(self, got: bytes, offset: int, want: bytes | None = None) -> str:
        """Where ``got`` (read at ``offset``) first differs, and whose write it lost."""
        if want is None:
            want = bytes(self.oracle.current[offset : offset + len(got)])
        differ = [i for i in range(min(len(got), len(want))) if got[i] != want[i]][:1]
        if not differ:
            return f"of length {len(got)}, expected {len(want)}"
        i = differ[0]
        pos = offset + i
        return (
            f"in block {pos // self.cfg.block_size}: byte {pos} is {got[i]:#04x}, "
            f"expected {want[i]:#04x} from {self.blame(pos)}"
        )

    async def verify_all(self, what: str) -> None:
        disk = await self.read_disk()
        if disk != bytes(self.oracle.current):
            raise self.fail(
                f"{what}: disk differs from acknowledged writes {self._mismatch(disk, 0)}"
            )

    # --- generating operations ------------------------------------------------------

    def _range(self) -> tuple[int, int]:
        rng = self.rng
        bs = self.cfg.block_size
        shape = rng.random()
        if shape < 0.35:  # aligned, whole blocks
            blocks = rng.randint(1, 3)
            offset = rng.randrange(0, self.cfg.blocks - blocks + 1) * bs
            return offset, blocks * bs
        if shape < 0.7 and bs > PAGE and rng.random() < 0.5:
            # whole pages inside blocks of several: format 2's page deltas
            pages = rng.randint(1, 2 * bs // PAGE)
            offset = rng.randrange(0, (self.cfg.blocks * bs) // PAGE - pages + 1) * PAGE
            return offset, pages * PAGE
        if shape < 0.7:  # small, unaligned, inside a block or across one edge
            length = rng.randint(1, bs)
            return rng.randrange(0, self.size - length + 1), length
        if shape < 0.85:  # large, unaligned
            length = rng.randint(bs, 4 * bs)
            return rng.randrange(0, self.size - length + 1), length
        length = rng.randint(1, 2 * bs)  # the partial tail
        return self.size - length, length

    def _gen_op(self, conn: int, busy: list[tuple[int, int, bool]]) -> _Op | None:
        rng = self.rng
        client = self.conn(conn)
        roll = rng.random()
        if roll < 0.08:
            return _Op("flush", conn)
        if roll < 0.10:
            return self._gen_invalid(conn)
        offset, length = self._range()
        if roll < 0.40:
            kind = "read"
        elif roll < 0.78:
            kind = "write"
        elif roll < 0.86:
            kind = "trim"
        elif roll < 0.94:
            kind = "zero"
        elif client.block_status:
            kind = "status"
        else:
            kind = "read"
        mutating = kind in ("write", "trim", "zero")
        for start, end, other_mutating in busy:
            if offset < end and start < offset + length and (mutating or other_mutating):
                return None
        busy.append((offset, offset + length, mutating))
        fua = mutating and rng.random() < 0.2
        data = rng.randbytes(length) if kind == "write" else b""
        if kind == "write" and rng.random() < 0.1:
            data = bytes(length)  # all zeros: stored as a hole
        flags = p.CMD_FLAG_FUA if fua else 0
        if kind == "zero" and rng.random() < 0.3:
            flags |= p.CMD_FLAG_NO_HOLE
        return _Op(kind, conn, offset, length, fua, data, flags)

    def _gen_invalid(self, conn: int) -> _Op:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:  # past the end
            length = rng.randint(1, 3 * self.cfg.block_size)
            offset = self.size - length + rng.randint(1, 100)
            command = rng.choice([p.Cmd.READ, p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES])
            data = rng.randbytes(length) if command == p.Cmd.WRITE else b""
            return _Op("invalid", conn, offset, length, data=data, command=command)
        if choice == 1:  # a flag the command may not carry
            return _Op("invalid", conn, 0, 512, flags=p.CMD_FLAG_REQ_ONE, command=p.Cmd.READ)
        if choice == 2:  # an unknown command
            return _Op("invalid", conn, 0, 0, command=rng.choice([9, 42, 0xFFFF]))
        # unknown flag bits on a write (the payload must still be skipped)
        return _Op(
            "invalid",
            conn,
            0,
            100,
            data=rng.randbytes(100),
            flags=1 << 9,
            command=p.Cmd.WRITE,
        )

    def _submit(self, op: _Op) -> asyncio.Future[Reply]:
        client = self.conn(op.conn)
        if op.kind == "read":
            return client.request(p.Cmd.READ, op.offset, op.length)
        if op.kind == "write":
            return client.request(p.Cmd.WRITE, op.offset, op.length, op.flags, op.data)
        if op.kind == "trim":
            return client.request(p.Cmd.TRIM, op.offset, op.length, op.flags)
        if op.kind == "zero":
            return client.request(p.Cmd.WRITE_ZEROES, op.offset, op.length, op.flags)
        if op.kind == "flush":
            return client.request(p.Cmd.FLUSH, 0, 0)
        if op.kind == "status":
            return client.request(p.Cmd.BLOCK_STATUS, op.offset, op.length)
        data = op.data if op.command == p.Cmd.WRITE else None
        return client.request(op.command, op.offset, op.length, op.flags, data)

    # --- one round of concurrent I/O ---------------------------------------------------

    async def io_round(self, crash_after: int | None) -> None:
        rng = self.rng
        busy: list[tuple[int, int, bool]] = []
        ops: list[_Op] = []
        for _ in range(rng.randint(1, 2 * self.cfg.connections)):
            op = self._gen_op(rng.randrange(self.cfg.connections), busy)
            if op is not None:
                ops.append(op)
        if not ops:
            return
        self.stats.rounds += 1
        before = bytes(self.oracle.current)
        self.oracle.begin_round()
        self.note(
            "round "
            + ", ".join(
                f"conn{o.conn}:{o.kind}{'+fua' if o.fua else ''}@{o.offset}+{o.length}" for o in ops
            )
            + (f" CRASH after {crash_after} yields" if crash_after is not None else "")
        )
        futures = [self._submit(op) for op in ops]
        if crash_after is not None:
            for _ in range(crash_after):
                await asyncio.sleep(0)
            results: list[Reply | None] = [
                f.result() if f.done() and not f.exception() else None for f in futures
            ]
        else:
            gathered = await asyncio.gather(*futures, return_exceptions=True)
            results = []
            for op, result in zip(ops, gathered, strict=True):
                if isinstance(result, BaseException):
                    raise self.fail(f"{op.kind} on conn{op.conn} failed: {result!r}")
                results.append(result)
        flushed = False
        for op, reply in zip(ops, results, strict=True):
            acked = reply is not None and reply.error == 0
            if reply is not None:
                self._check_reply(op, reply, before)
            if reply is not None and reply.error and op.kind in ("write", "trim", "zero"):
                # Failed: applied or not, the range shows which (all or nothing).
                acked = await self._took_effect(op, before)
            data = op.data if op.kind == "write" else bytes(op.length)
            if op.kind in ("write", "trim", "zero"):
                # An applied write that failed is in memory, never promised durable.
                forced = op.fua and reply is not None and reply.error == 0
                self.oracle.write(op.offset, data, acked=acked, forced=forced)
                if acked:
                    label = f"{op.kind}@{op.offset}+{op.length} (step {self.step}, conn{op.conn})"
                    self.writers[op.offset : op.offset + op.length] = [label] * op.length
            elif op.kind == "flush" and acked:
                flushed = True
        self.oracle.end_round(flushed=flushed)
        self.step += len(ops)
        if crash_after is not None:
            await self.crash_and_check("crash during I/O")
            self.stats.crashes_mid_io += 1

    async def _took_effect(self, op: _Op, before: bytes) -> bool:
        """Whether a failed write, trim or zero was applied: read its range.

        The device applies a request's pieces together or not at all (a FUA
        write is applied, then its flush fails), so the range must hold all
        the old bytes or all the new ones.
        """
        old = before[op.offset : op.offset + op.length]
        new = op.data if op.kind == "write" else bytes(op.length)
        if old == new:
            return False
        got = await self.read_range(op.offset, op.length, f"reading back the failed {op.kind}")
        if got == new:
            self.stats.took_effect += 1
            return True
        if got == old:
            return False
        raise self.fail(
            f"{op.kind}@{op.offset}+{op.length} on conn{op.conn} failed and left its range "
            "holding neither the old data nor the new"
        )

    def _check_reply(self, op: _Op, reply: Reply, before: bytes) -> None:
        stats = self.stats
        if op.kind == "invalid":
            stats.invalid += 1
            if reply.error == 0:
                raise self.fail(f"invalid request {op} was accepted")
            return
        if reply.error:
            reads = op.kind in ("read", "status")
            allowed = self.faults.read_errors_allowed() if reads else self.faults.errors_allowed()
            if not allowed:
                raise self.fail(
                    f"{op.kind}@{op.offset}+{op.length} failed with error {reply.error}"
                    + self._storage_state()
                )
            stats.failed_requests += 1
            return
        if op.kind == "read":
            stats.reads += 1
            want = before[op.offset : op.offset + op.length]
            if reply.data != want:
                raise self.fail(
                    f"read@{op.offset}+{op.length} on conn{op.conn} returned stale or wrong "
                    f"data {self._mismatch(reply.data, op.offset)}"
                )
            stats.bytes_verified += op.length
        elif op.kind == "write":
            stats.writes += 1
            stats.fua_writes += op.fua
            stats.bytes_written += op.length
        elif op.kind == "trim":
            stats.trims += 1
        elif op.kind == "zero":
            stats.zeroes += 1
        elif op.kind == "flush":
            stats.flushes += 1
        elif op.kind == "status":
            stats.block_statuses += 1
            self._check_extents(op, reply, before)

    def _check_extents(self, op: _Op, reply: Reply, before: bytes) -> None:
        total = sum(length for length, _ in reply.extents)
        if not reply.extents or total > op.length or any(n == 0 for n, _ in reply.extents):
            raise self.fail(f"block status extents {reply.extents} for length {op.length}")
        pos = op.offset
        for length, flags in reply.extents:
            if flags & p.STATE_HOLE and not flags & p.STATE_ZERO:
                raise self.fail("block status reports a hole that does not read as zeros")
            if flags & p.STATE_ZERO and any(before[pos : pos + length]):
                raise self.fail(f"block status says {pos}+{length} is zero; it is not")
            pos += length

    # --- crashes ------------------------------------------------------------------------

    async def crash_and_check(self, why: str, uncertain: str | None = None) -> None:
        self.stats.crashes += 1
        self.note(f"crash: {why}")
        await self.crash_instance()
        disk = await self.read_disk()
        acknowledged = bytes(self.oracle.current)
        problems = self.oracle.check_after_crash(disk)
        if problems:
            first = self._mismatch(disk, 0, acknowledged)
            raise self.fail(
                f"after {why}: " + "; ".join(problems[:5]) + f" (first difference {first})"
            )
        await self.sync_snapshots(uncertain)

    async def sync_snapshots(self, uncertain: str | None = None) -> None:
        """The catalog must list exactly the snapshots the model knows."""
        assert self.instance is not None and self.instance.store is not None
        names = {s.name for s in self.instance.store.catalog.snapshots}
        known = set(self.snapshots)
        if uncertain is not None:
            names.discard(uncertain)
            known.discard(uncertain)
        if names != known:
            raise self.fail(f"catalog lists {sorted(names)}, expected {sorted(known)}")

    # --- snapshots and restores ---------------------------------------------------------------

    async def control(self, kind: str, **args: Any) -> Any:
        assert self.instance is not None
        try:
            return await self.instance.handle(cp.Request(kind, args))
        except cp.BadRequest as exc:  # what the control server would answer
            return cp.error(str(exc))
        except Exception as exc:
            if not self.faults.errors_allowed():
                raise
            return cp.error(f"{kind} failed: {exc}")  # ControlServer._answer does this

    async def snapshot_create(self, crash_after: int | None) -> None:
        self.snapshot_counter += 1
        name = f"s{self.snapshot_counter}"
        self.note(f"snapshot create {name}" + (" CRASH" if crash_after is not None else ""))
        content = bytes(self.oracle.current)
        self.names.add(name)
        if crash_after is None:
            response = await self.control("SnapshotCreate", name=name)
            if "Snapshot" not in response and self.faults.errors_allowed():
                # The data could not be made durable: no snapshot may exist.
                self.stats.failed_requests += 1
                assert self.instance is not None and self.instance.store is not None
                if self.instance.store.catalog.find(name) is not None:
                    raise self.fail(f"snapshot create failed ({response}) but {name} is listed")
                return
            if "Snapshot" not in response:
                raise self.fail(f"snapshot create failed: {response}")
            self.snapshots[name] = content
            self.stats.snapshots += 1
            return
        task = asyncio.ensure_future(self.control("SnapshotCreate", name=name))
        await self._yield(crash_after)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self.stats.crashes_mid_admin += 1
        await self.crash_and_check(f"crash during snapshot create {name}", name)
        assert self.instance is not None and self.instance.store is not None
        if self.instance.store.catalog.find(name) is not None:
            self.snapshots[name] = content
            self.stats.snapshots += 1

    async def snapshot_delete(self, crash_after: int | None) -> None:
        missing = self.rng.random() < 0.1
        if missing or not self.names:
            name = "no-such-snapshot"
            response = await self.control("SnapshotDelete", name=name)
            if response == "Ok":
                raise self.fail("deleting a missing snapshot succeeded")
            return
        name = self.rng.choice(sorted(self.names))
        self.names.discard(name)
        self.note(f"snapshot delete {name}" + (" CRASH" if crash_after is not None else ""))
        if name not in self.snapshots:  # its create was cut short by a crash
            response = await self.control("SnapshotDelete", name=name)
            if response == "Ok":
                raise self.fail(f"deleting {name}, which does not exist, succeeded")
            return
        if crash_after is None:
            response = await self.control("SnapshotDelete", name=name)
            if response != "Ok":
                raise self.fail(f"snapshot delete failed: {response}")
            del self.snapshots[name]
            self.stats.deletes += 1
            return
        task = asyncio.ensure_future(self.control("SnapshotDelete", name=name))
        await self._yield(crash_after)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self.stats.crashes_mid_admin += 1
        await self.crash_and_check(f"crash during snapshot delete {name}", name)
        assert self.instance is not None and self.instance.store is not None
        if self.instance.store.catalog.find(name) is None:
            del self.snapshots[name]
            self.stats.deletes += 1

    async def restore(self, crash_after: int | None) -> None:
        missing = self.rng.random() < 0.05
        if missing or not self.names:
            response = await self.control("SnapshotRestore", name="no-such-snapshot", force=True)
            if response == "Ok":
                raise self.fail("restoring a missing snapshot succeeded")
            return
        name = self.rng.choice(sorted(self.names))
        self.note(f"restore {name}" + (" CRASH" if crash_after is not None else ""))
        if name not in self.snapshots:  # its create was cut short by a crash
            response = await self.control("SnapshotRestore", name=name, force=True)
            if response == "Ok":
                raise self.fail(f"restoring {name}, which does not exist, succeeded")
            return
        content = self.snapshots[name]
        if crash_after is None:
            # Clients are connected. Without force their I/O pauses for the
            # swap and they stay; with force they are sent away first.
            force = self.stats.restores % 2 == 1
            response = await self.control("SnapshotRestore", name=name, force=force)
            if response != "Ok" and not self.faults.errors_allowed():
                raise self.fail(f"restore failed: {response}")
            if force:
                for conn in self.conns:
                    if conn is not None:
                        await conn.client.stop()
            if response != "Ok":
                # "disk unchanged": a forced restore sent the clients away, nothing else.
                self.stats.failed_requests += 1
                self.note(f"restore {name} failed: {response}")
                if force:
                    await self.connect_all()
                return
            assert self.instance is not None and self.instance.last_restore is not None
            if not force and self.instance.last_restore["disconnected"]:
                raise self.fail(f"restore without force disconnected: {self.instance.last_restore}")
            self.stats.restores += 1
            self.oracle.reset(content)
            self.writers = [f"restore of {name} (step {self.step})"] * self.size
            if force:
                await self.connect_all()
            await self.verify_all(f"after restoring {name}" + (" (forced)" if force else ""))
            return
        task = asyncio.ensure_future(self.control("SnapshotRestore", name=name, force=True))
        await self._yield(crash_after)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self.stats.crashes_mid_admin += 1
        self.stats.crashes += 1
        self.note(f"crash during restore {name}")
        await self.crash_instance()
        disk = await self.read_disk()
        if disk == content:
            self.oracle.reset(disk)
            self.stats.restores += 1
        else:
            problems = self.oracle.check_after_crash(disk)
            if problems:
                raise self.fail(
                    f"after a crash during restore of {name} the disk is neither the old "
                    f"content nor the snapshot: {'; '.join(problems[:5])}"
                )
        await self.sync_snapshots()

    async def _yield(self, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def reconnect(self) -> None:
        slot = self.rng.randrange(self.cfg.connections)
        self.note(f"reconnect conn{slot}")
        await self.conn(slot).disconnect()
        self.stats.reconnects += 1
        await self.connect(slot)

    # --- the main loop ------------------------------------------------------------------

    async def run(self) -> Stats:
        self.note(f"device dirty_blocks={self.dirty_blocks} cache_blocks={self.cache_blocks}")
        if self.faults.enabled:
            self.note(f"faults: {self.faults.schedule()}")
        with self.faults.installed():
            try:
                return await self._run()
            except SimulationFailure:
                raise
            except Exception as exc:
                # Reported like any failure (seed, history, replay): a hunt
                # goes on with the next seed instead of dying with a traceback.
                log.debug("unexpected exception", exc_info=True)
                raise self.fail(f"unexpected {type(exc).__name__}: {exc}") from exc
            finally:
                self.stats.injected = self.faults.injected
                self.stats.injected_by = self.faults.describe()
                self.faults.stop()
                await self._shutdown()

    async def _run(self) -> Stats:
        await self.open_instance()
        await self.connect_all()
        while self.step < self.cfg.steps:
            await self._bounded_step(self._fault_tick())
            await self._bounded_step(self._one_step())
            for conn in self.conns:
                if conn is not None and conn.client.failure:
                    raise self.fail(conn.client.failure)
        if self.faults.enabled:
            await self._bounded_step(self._end_of_faults())
        await self.verify_all("at the end")
        self.stats.steps = self.step
        return self.stats

    async def _bounded_step(self, step: Any) -> None:
        try:
            await asyncio.wait_for(step, STEP_TIMEOUT)
        except TimeoutError:
            raise self.fail(f"hang: a step did not finish within {STEP_TIMEOUT:g}s") from None

    # --- faults -------------------------------------------------------------------------

    async def _fault_tick(self) -> None:
        """Open and close the fault windows; after one closes, recovery is due."""
        for window in self.faults.at_step(self.step):
            self.note(f"fault window from step {window.start_step} ({window.seconds:.2f}s) ends")
            await self.recover(
                f"after the {self.faults.kind} that began at step {window.start_step}"
            )
            await self.verify_all(f"after the {self.faults.kind}")

    async def recover(self, when: str) -> None:
        """FLUSH until it succeeds; a store that stays broken is a failure."""
        client = self.conn(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0
        while True:
            attempts += 1
            reply = await client.request(p.Cmd.FLUSH, 0, 0)
            if not reply.error:
                break
            if loop.time() - started > RECOVERY_S:
                raise self.fail(
                    f"no recovery {when}: FLUSH still fails (error {reply.error}) "
                    f"after {attempts} attempts in {RECOVERY_S:g}s"
                )
            await asyncio.sleep(RETRY_PAUSE_S)
        # Every write acknowledged so far is durable now.
        self.oracle.begin_round()
        self.oracle.end_round(flushed=True)
        self.faults.recovered()
        self.stats.recoveries += 1
        self.note(f"recovered {when}: FLUSH ok after {attempts} attempt(s)")

    async def _end_of_faults(self) -> None:
        """The faults stop for good: FLUSH works again, and what it made
        durable is exactly the disk, also after a crash."""
        self.faults.stop()
        await self.recover("once the faults stopped")
        await self.verify_all("after the faults stopped")
        await self.crash_and_check("crash after the faults stopped")

    async def _one_step(self) -> None:
        rng = self.rng
        roll = rng.random()
        crash = rng.randint(0, 40)
        if roll < 0.74:
            await self.io_round(None)
        elif roll < 0.78:
            await self.io_round(crash)
        elif roll < 0.81:
            self.step += 1
            await self.verify_all("full verify")
        elif roll < 0.85:
            self.step += 1
            await self.crash_and_check("crash between operations")
        elif roll < 0.89:
            self.step += 1
            await self.snapshot_create(crash if rng.random() < 0.2 else None)
        elif roll < 0.91:
            self.step += 1
            await self.snapshot_delete(crash if rng.random() < 0.2 else None)
        elif roll < 0.95:
            self.step += 1
            await self.restore(crash if rng.random() < 0.2 else None)
        else:
            self.step += 1
            await self.reconnect()

    async def _shutdown(self) -> None:
        await self.drop_clients()
        if self.instance is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.instance.close(), STEP_TIMEOUT)
        for instance in self.abandoned:
            if instance.store is not None:
                # Fenced long ago; closing only releases their resources.
                with contextlib.suppress(Exception):
                    await instance.store.close()
        self.abandoned.clear()


def run_simulation(cfg: SimConfig) -> Stats:
    return asyncio.run(Simulation(cfg).run())
