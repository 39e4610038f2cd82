"""A restore's I/O pause when it goes wrong: the gate opens again, the disk is unchanged.

In-process, as the simulation runs: a real Instance on SlateDB's memory
store, clients over the loopback transport. The store is made to hold
calls (a stuck object store) or to fail them, through the same open hook
the simulation's faults use.
"""

from __future__ import annotations

import asyncio
from typing import Any

from portalbd.dst.faults import FaultPlan, FaultyDb
from portalbd.dst.sim import SimConfig, Simulation
from portalbd.nbd import protocol as p
from portalbd.store import slate

BLOCK = 4096


class _Holding(FaultPlan):
    """Holds the data database's writes and flushes while ``hold`` is set."""

    def __init__(self) -> None:
        super().__init__("none", 1)
        self.hold: asyncio.Event | None = None

    async def before(self, what: str, db: FaultyDb) -> None:
        if self.hold is not None and what in ("write", "flush"):
            await self.hold.wait()


def _route_through(plan: FaultPlan) -> None:
    """Data databases opened from now on go through ``plan``."""

    async def hook(builder: Any, path: str) -> Any:
        db = await builder.build()
        return FaultyDb(db, plan) if "/gen/" in f"/{path}" else db

    slate.OPEN_HOOK[0] = hook


async def _started(plan: FaultPlan | None) -> Simulation:
    if plan is not None:
        _route_through(plan)
    sim = Simulation(SimConfig(seed=1, steps=1))
    await sim.open_instance()
    await sim.connect_all()
    return sim


def test_a_restore_whose_running_requests_do_not_finish_fails_and_resumes_io() -> None:
    plan = _Holding()

    async def scenario() -> None:
        sim = await _started(plan)
        try:
            assert sim.instance is not None and sim.instance.server is not None
            assert "Snapshot" in await sim.control("SnapshotCreate", name="s1")
            client = sim.conn(0)
            written = b"n" * BLOCK
            assert (await client.request(p.Cmd.WRITE, 0, BLOCK, data=written)).error == 0
            plan.hold = asyncio.Event()
            flush = client.request(p.Cmd.FLUSH, 0, 0)
            await asyncio.sleep(0.05)  # the flush reaches the store and sticks there
            # The pause is bounded by [storage] timeout_ms as the restore reads it;
            # the store's own bound was fixed at open (12 s), so the flush stays stuck.
            sim.instance.config.storage.timeout_ms = 200
            response = await sim.control("SnapshotRestore", name="s1")
            assert response == {
                "Error": "restore failed, disk unchanged: could not pause I/O: "
                "1 NBD request still running after 0.2s"
            }
            assert sim.instance.server.paused is None and sim.instance.last_restore is None
            # Requests are served again meanwhile: a read from the cache answers.
            read = await asyncio.wait_for(client.request(p.Cmd.READ, 0, BLOCK), 5)
            assert read.data == written
            plan.hold.set()
            plan.hold = None
            assert (await asyncio.wait_for(flush, 5)).error == 0
            assert sim.instance.server.attached_clients() == 3
        finally:
            slate.OPEN_HOOK[0] = None
            await sim._shutdown()

    asyncio.run(scenario())


def test_a_failed_paused_restore_keeps_the_clients_and_the_disk() -> None:
    plan = FaultPlan("errors", 1)
    plan.error_rate = 1.0  # every call of the clone fails

    async def scenario() -> None:
        sim = await _started(None)
        try:
            assert sim.instance is not None and sim.instance.server is not None
            assert "Snapshot" in await sim.control("SnapshotCreate", name="s1")
            client = sim.conn(1)
            written = b"w" * BLOCK
            assert (await client.request(p.Cmd.WRITE, 0, BLOCK, data=written)).error == 0
            _route_through(plan)
            response = await sim.control("SnapshotRestore", name="s1")
            assert response["Error"].startswith("restore failed, disk unchanged: "), response
            assert sim.instance.server.paused is None
            assert sim.instance.server.attached_clients() == 3
            read = await asyncio.wait_for(client.request(p.Cmd.READ, 0, BLOCK), 5)
            assert (read.error, read.data) == (0, written)
        finally:
            slate.OPEN_HOOK[0] = None
            await sim._shutdown()

    asyncio.run(scenario())
