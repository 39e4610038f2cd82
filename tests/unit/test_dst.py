"""Deterministic simulation over a range of seeds, and the bugs it found.

Each seed drives concurrent NBD connections (in-process transport) against a
real Instance on SlateDB's memory store, with snapshots, restores and
crashes, and checks every read and every post-crash state against the
oracle. A failure names the seed and the replay command.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import pytest

from portalbd.config import LsmConfig
from portalbd.device import Device
from portalbd.dst.cli import main as dst_main
from portalbd.dst.cli import replay_command
from portalbd.dst.faults import KINDS, FaultPlan, FaultyDb, kind_for
from portalbd.dst.oracle import DiskOracle
from portalbd.dst.sim import SimConfig, Simulation, SimulationFailure, Stats, run_simulation
from portalbd.instance import Instance
from portalbd.store import slate
from portalbd.store.slate import SlateHandle, resolve_object_store

SEEDS = int(os.environ.get("PORTALBD_DST_SEEDS", "12"))
STEPS = int(os.environ.get("PORTALBD_DST_STEPS", "250"))


def simulate(cfg: SimConfig) -> Stats:
    """Run one seed; a failure shows its history and the command that replays it."""
    try:
        return run_simulation(cfg)
    except SimulationFailure as exc:
        history = "\n".join(exc.history)
        pytest.fail(f"{exc}\n{history}\nreplay: {replay_command(cfg, exc.step + 1)}", pytrace=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_simulation_seed(seed: int) -> None:
    cfg = SimConfig(seed=seed, steps=STEPS, flush_interval_ms=0 if seed % 3 else 20)
    stats = simulate(cfg)
    assert stats.steps >= STEPS
    assert stats.bytes_verified > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(100, 100 + max(2, SEEDS // 2)))
def test_simulation_seed_page_deltas(seed: int) -> None:
    """16 KiB blocks of four pages: page writes into unread blocks become
    deltas that reads, later writes, drains, crashes and restores must merge.
    Half of these seeds run without a cache, so every read goes to the store."""
    cfg = SimConfig(
        seed=seed, steps=STEPS, block_size=16384, blocks=24, cache_blocks=0 if seed % 2 else None
    )
    stats = simulate(cfg)
    assert stats.steps >= STEPS


@pytest.mark.timeout(120)
def test_simulation_seed_encrypted() -> None:
    """An encrypted disk (every value sealed) through writes, page deltas,
    crashes, snapshots and restores; the CLI spells the option out for replay."""
    cfg = SimConfig(seed=5, steps=120, block_size=16384, blocks=24, encrypted=True)
    stats = simulate(cfg)
    assert stats.steps >= 120 and stats.bytes_verified > 0
    assert replay_command(cfg, 9) == (
        "portalbd-dst --seed 5 --steps 9 --block-size 16384 --blocks 24 --encrypted"
    )


def test_same_seed_same_run() -> None:
    """The generated operations depend only on the seed, whatever SlateDB's
    threads did (even how a crash in the middle of a snapshot turned out)."""
    runs = []
    for _ in range(2):
        sim = Simulation(SimConfig(seed=7, steps=120))
        asyncio.run(sim.run())
        runs.append(sim.history)
    assert runs[0] == runs[1]


def test_cli_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert dst_main(["--seed", "3", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok seed=3 ")
    assert "crashes=" in out


def test_a_hunt_runs_seeds_in_parallel_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert dst_main(["--seed", "3", "--seeds", "2", "--steps", "30", "--jobs", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("ok seed=") == 2
    assert "summary: 2 seeds from 3, 0 failed" in captured.out
    assert "failed peer=" not in captured.err  # the workers log at the parent's level


def test_replay_command_names_the_seed_and_options() -> None:
    cfg = SimConfig(seed=42, steps=500, connections=5)
    assert replay_command(cfg, 17) == "portalbd-dst --seed 42 --steps 17 --connections 5"


def test_oracle_rejects_a_lost_flushed_write() -> None:
    oracle = DiskOracle(8192, 4096)
    oracle.begin_round()
    oracle.write(0, b"A" * 4096, acked=True, forced=False)
    oracle.end_round(flushed=False)
    oracle.begin_round()
    oracle.end_round(flushed=True)  # a FLUSH after the write
    assert oracle.check_after_crash(bytes(8192))  # the write vanished: caught


def test_oracle_accepts_unflushed_loss_but_not_a_torn_block() -> None:
    oracle = DiskOracle(4096, 4096)
    oracle.begin_round()
    oracle.write(0, b"A" * 4096, acked=True, forced=False)
    oracle.end_round(flushed=False)
    assert not _copy(oracle).check_after_crash(bytes(4096))  # lost: allowed
    torn = b"A" * 2048 + bytes(2048)
    assert oracle.check_after_crash(torn)  # half a write inside one piece: never


def test_oracle_fua_write_must_survive() -> None:
    oracle = DiskOracle(4096, 4096)
    oracle.begin_round()
    oracle.write(0, b"B" * 100, acked=True, forced=True)
    oracle.write(100, b"C" * 100, acked=True, forced=False)
    oracle.end_round(flushed=False)
    assert not _copy(oracle).check_after_crash(b"B" * 100 + bytes(3996))
    assert oracle.check_after_crash(bytes(100) + b"C" * 100 + bytes(3896))


# --- object-store faults ------------------------------------------------------------

FAULT_SEEDS = int(os.environ.get("PORTALBD_DST_FAULT_SEEDS", "3"))
FAULT_STEPS = int(os.environ.get("PORTALBD_DST_FAULT_STEPS", "120"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(FAULT_SEEDS))
@pytest.mark.parametrize("kind", KINDS[1:])
def test_simulation_under_faults(kind: str, seed: int) -> None:
    """Every kind of fault, injected where the device meets SlateDB: what
    failed may or may not have happened, nothing acknowledged is lost, and
    FLUSH works again once the faults end (checked again after a crash)."""
    stats = simulate(SimConfig(seed=seed, steps=FAULT_STEPS, faults=kind))
    assert stats.faults == kind
    assert stats.injected > 0, stats.summary()
    assert stats.recoveries >= 1
    if kind == "latency":
        assert stats.failed_requests == 0  # slow is not broken
    elif kind == "enospc":
        assert "stalls:" in stats.injected_by, stats.summary()
    elif kind == "outage":
        assert stats.failed_requests > 0, stats.summary()
    # "errors": how many calls a seed makes depends on the writeback's timing,
    # and an error or two can land where the device retries (a drain that is
    # put back and written again): absorbed, which is right, so no count.


def test_fault_seed_mode_spreads_the_kinds_over_seeds() -> None:
    kinds = {kind_for("seed", seed) for seed in range(40)}
    assert kinds == set(KINDS)
    assert kind_for("outage", 7) == "outage"


def test_a_fault_plan_is_the_same_for_the_same_seed() -> None:
    first, again = FaultPlan("outage", 11), FaultPlan("outage", 11)
    assert first.schedule() == again.schedule()
    assert first.schedule() != FaultPlan("outage", 12).schedule()
    assert FaultPlan("errors", 3).error_rate > 0


def test_faults_leave_the_generated_workload_alone() -> None:
    """Under faults the operations still depend only on the seed, although
    which requests fail (and so what is read back and retried) varies."""
    runs = []
    for _ in range(2):
        sim = Simulation(SimConfig(seed=5, steps=80, faults="outage"))
        asyncio.run(sim.run())
        runs.append([line for line in sim.history if "] round " in line])
    assert runs[0] == runs[1]


def test_unknown_fault_kind_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown fault kind 'flood'; choose from none, seed"):
        Simulation(SimConfig(seed=1, steps=1, faults="flood"))


def test_cli_refuses_an_unknown_fault_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        dst_main(["--faults", "flood"])
    assert exited.value.code == 2
    assert "argument --faults: invalid choice: 'flood'" in capsys.readouterr().err


def test_cli_counts_injected_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert dst_main(["--seed", "1", "--steps", "60", "--faults", "errors"]) == 0
    out = capsys.readouterr().out
    assert "faults=errors injected=" in out
    assert "injected_by=errors:" in out


def test_replay_command_spells_out_the_fault_kind_a_seed_picked() -> None:
    cfg = SimConfig(seed=4, steps=90, faults="seed")
    kind = kind_for("seed", 4)
    expected = "portalbd-dst --seed 4 --steps 9" + ("" if kind == "none" else f" --faults {kind}")
    assert replay_command(cfg, 9) == expected
    assert replay_command(SimConfig(seed=4, steps=9, faults="enospc"), 9).endswith(
        "--faults enospc"
    )


@pytest.mark.timeout(120)
def test_the_simulation_catches_a_drain_that_drops_its_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sabotage the system under test: a drain that fails forgets its blocks
    instead of putting them back (the fsyncgate mistake). Under an outage
    the simulation must report it, naming the acknowledged write it lost."""
    monkeypatch.setattr(Device, "_put_back", lambda self, draining: None)
    messages = []
    for seed in range(3, 9):
        try:
            run_simulation(SimConfig(seed=seed, steps=200, faults="outage"))
        except SimulationFailure as exc:
            messages.append(exc.message)
            if "from the acknowledged " in exc.message:
                break
    assert messages, "six outage seeds missed a drain that drops its blocks"
    assert re.search(
        r"expected 0x[0-9a-f]{2} from the acknowledged (write|trim|zero)@\d+\+\d+ "
        r"\(step \d+, conn\d\)",
        messages[-1],
    ), messages


def test_an_unexpected_exception_is_a_failing_seed_not_a_dead_hunt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception the simulation does not expect (here a sabotaged control
    handler) is reported like any failure, with the seed and a replay, and
    the hunt goes on with the next seed."""

    async def broken(self: Instance, request: object) -> object:
        raise RuntimeError("control handler sabotaged")

    monkeypatch.setattr(Instance, "handle", broken)
    assert dst_main(["--seed", "3", "--seeds", "2", "--steps", "100"]) == 1
    err = capsys.readouterr().err
    assert "FAILED seed=3: unexpected RuntimeError: control handler sabotaged" in err
    assert "FAILED seed=4: unexpected RuntimeError" in err
    assert "replay: portalbd-dst --seed 3 --steps " in err


def test_a_request_failing_without_faults_says_why_storage_failed() -> None:
    """A failure the faults do not explain names the store's last error, so a
    bug reads differently from a machine too slow for the storage bound."""
    plan = FaultPlan("errors", 1)
    plan.error_rate = 0.0

    async def scenario() -> str:
        sim = Simulation(SimConfig(seed=2, steps=1000))  # the simulation expects no faults
        with plan.installed():
            try:
                await sim.open_instance()
                await sim.connect_all()
                plan.error_rate = 1.0  # ...but the data database now fails every call
                for _ in range(100):
                    await sim.io_round(None)
            except SimulationFailure as exc:
                return exc.message
            finally:
                plan.stop()
                await sim._shutdown()
        return "no failure"

    message = asyncio.run(scenario())
    assert re.search(r"failed with error 5 \(storage: \w+ failed: Unavailable error: ", message), (
        message
    )


def _copy(oracle: DiskOracle) -> DiskOracle:
    import copy

    return copy.deepcopy(oracle)


# --- regressions -------------------------------------------------------------------


async def _device_with_cache(cache_blocks: int) -> tuple[Device, SlateHandle]:
    store = await SlateHandle.open(
        resolve_object_store("memory:///"),
        "dev",
        LsmConfig(flush_interval_ms=0, block_cache_size_bytes=0),
    )
    bs = 4096
    device = Device(
        store, size=64 * bs, block_size=bs, cache_bytes=cache_blocks * bs, dirty_bytes=64 * bs
    )
    device.start()
    pattern = bytes(range(256)) * 16 * 16
    await device.write(0, memoryview(pattern))
    await device.flush()
    device.forget_clean_cache()
    return device, store


@pytest.mark.parametrize("cache_blocks", [0, 4])
def test_read_larger_than_the_clean_cache_completes(cache_blocks: int) -> None:
    """Bug (found by the simulation): a read needing more blocks than the
    clean cache holds loaded them, evicted them again and looped forever, so
    with ``cache_bytes = 0`` every uncached read hung."""

    async def scenario() -> None:
        device, store = await _device_with_cache(cache_blocks)
        data = await asyncio.wait_for(device.read(0, 16 * 4096), 10)
        assert bytes(data) == bytes(range(256)) * 16 * 16
        await device.stop()
        await store.close()

    asyncio.run(scenario())


def test_partial_write_with_caching_disabled_completes() -> None:
    """Bug: with ``cache_bytes = 0`` an unaligned write waited forever for
    its block to appear in a cache that never keeps anything."""

    async def scenario() -> None:
        device, store = await _device_with_cache(0)
        await asyncio.wait_for(device.write(10, memoryview(b"x" * 100)), 10)
        data = await asyncio.wait_for(device.read(0, 4096), 10)
        expected = bytearray(bytes(range(256)) * 16)
        expected[10:110] = b"x" * 100
        assert bytes(data) == bytes(expected)
        await device.stop()
        await store.close()

    asyncio.run(scenario())


def test_concurrent_reads_of_the_same_missing_run() -> None:
    """Bug (found by the simulation, seeds 3 and 8): two reads that both
    missed the same run of consecutive blocks each started a range-scan
    load; the second replaced the first's entries in the loading table and
    then failed with KeyError when it removed them (the client got EIO)."""

    async def scenario() -> None:
        device, store = await _device_with_cache(64)
        device.forget_clean_cache()
        first, second = await asyncio.wait_for(
            asyncio.gather(device.read(0, 8 * 4096), device.read(0, 8 * 4096)), 10
        )
        expected = bytes(range(256)) * 16 * 8
        assert bytes(first) == expected
        assert bytes(second) == expected
        await device.stop()
        await store.close()

    asyncio.run(scenario())


def test_a_failed_restore_closes_the_database_it_opened() -> None:
    """Bug (found while adding faults to the simulation): a restore that
    opened the cloned generation and then failed to write its metadata
    answered "disk unchanged" but left that database open for good, its
    background tasks still running against a generation garbage collection
    deletes next."""
    plan = FaultPlan("errors", 1)
    plan.error_rate = 1.0  # the store fails every call of the new database
    opened: list[_ClosingWatched] = []

    async def hook(builder: Any, path: str) -> Any:
        db = _ClosingWatched(await builder.build(), plan)
        opened.append(db)
        return db

    async def scenario() -> None:
        sim = Simulation(SimConfig(seed=1, steps=1))
        await sim.open_instance()
        await sim.connect_all()
        assert "Snapshot" in await sim.control("SnapshotCreate", name="s1")
        slate.OPEN_HOOK[0] = hook
        try:
            response = await sim.control("SnapshotRestore", name="s1", force=True)
        finally:
            slate.OPEN_HOOK[0] = None
        assert "restore failed, disk unchanged" in str(response)
        assert opened, "the restore never opened the clone"
        assert all(db.shut_down for db in opened), "the clone's database was left open"
        await sim._shutdown()

    asyncio.run(scenario())


class _ClosingWatched(FaultyDb):
    """A faulty database that remembers whether it was shut down."""

    shut_down = False

    async def shutdown(self) -> Any:
        self.shut_down = True
        return await super().shutdown()
