"""Deterministic simulation over a range of seeds, and the bugs it found.

Each seed drives concurrent NBD connections (in-process transport) against a
real Instance on SlateDB's memory store, with snapshots, restores and
crashes, and checks every read and every post-crash state against the
oracle. A failure names the seed and the replay command.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from portalbd.config import LsmConfig
from portalbd.device import Device
from portalbd.dst.cli import main as dst_main
from portalbd.dst.cli import replay_command
from portalbd.dst.oracle import DiskOracle
from portalbd.dst.sim import SimConfig, Simulation, SimulationFailure, Stats, run_simulation
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
