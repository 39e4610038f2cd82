"""``portalbd-dst``: run seeded simulations; on failure, say how to replay."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from dataclasses import dataclass, field

from portalbd import __version__
from portalbd.dst.faults import CHOICES, kind_for
from portalbd.dst.sim import SimConfig, SimulationFailure, run_simulation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portalbd-dst",
        description="Deterministic simulation of portalbd: seeded I/O, snapshots, "
        "restores, crashes and object-store faults against an oracle of the disk.",
    )
    parser.add_argument("--version", action="version", version=f"portalbd-dst {__version__}")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed")
    parser.add_argument("--steps", type=int, default=300, help="operations per seed")
    parser.add_argument("--connections", type=int, default=3, help="NBD connections")
    parser.add_argument("--block-size", type=int, default=4096, help="device block size")
    parser.add_argument("--blocks", type=int, default=48, help="device size in blocks")
    parser.add_argument(
        "--flush-interval-ms", type=int, default=0, help="SlateDB WAL flush interval (0=manual)"
    )
    parser.add_argument(
        "--cache-blocks",
        type=int,
        default=None,
        help="clean-cache size in blocks (default: chosen by the seed; 0 disables it)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds run in parallel processes (a hunt: --seeds 10000 --jobs $(nproc))",
    )
    parser.add_argument(
        "--faults",
        choices=CHOICES,
        default="none",
        help="object-store faults on the data databases: errors (S3 calls fail, some "
        "close the database), latency (delays; nothing may fail), outage (every call "
        "fails for a while), enospc (a full disk: flushes stall until the storage "
        "timeout), or seed (each seed picks one kind, none included). Default none: "
        "a seed's run, its replay command and the CI timings stay what they were "
        "without faults; a hunt asks for them (--faults seed)",
    )
    parser.add_argument(
        "--encrypted",
        action="store_true",
        help="simulate an encrypted disk (format 3, every value sealed; key from the seed)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the daemon's warnings")
    return parser


def replay_command(cfg: SimConfig, steps: int) -> str:
    parts = [f"portalbd-dst --seed {cfg.seed} --steps {steps}"]
    defaults = SimConfig(seed=0, steps=0)
    if cfg.connections != defaults.connections:
        parts.append(f"--connections {cfg.connections}")
    if cfg.block_size != defaults.block_size:
        parts.append(f"--block-size {cfg.block_size}")
    if cfg.blocks != defaults.blocks:
        parts.append(f"--blocks {cfg.blocks}")
    if cfg.flush_interval_ms != defaults.flush_interval_ms:
        parts.append(f"--flush-interval-ms {cfg.flush_interval_ms}")
    if cfg.cache_blocks is not None:
        parts.append(f"--cache-blocks {cfg.cache_blocks}")
    if cfg.encrypted:
        parts.append("--encrypted")
    faults = kind_for(cfg.faults, cfg.seed)  # the kind "seed" picked, spelled out
    if faults != "none":
        parts.append(f"--faults {faults}")
    return " ".join(parts)


@dataclass(slots=True)
class Outcome:
    cfg: SimConfig
    seconds: float
    summary: str = ""
    failure: str = ""
    history: list[str] = field(default_factory=list)
    step: int = 0


def quiet_logging(level: int) -> None:
    """A spawned worker starts with no logging set up: give it the parent's level."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_one(cfg: SimConfig) -> Outcome:
    """One seed; what it found, in a form that crosses a process boundary."""
    started = time.monotonic()
    try:
        stats = run_simulation(cfg)
    except SimulationFailure as exc:
        return Outcome(cfg, time.monotonic() - started, "", exc.message, exc.history, exc.step)
    return Outcome(cfg, time.monotonic() - started, stats.summary())


def report(outcome: Outcome) -> bool:
    """Print one seed's result; True when it failed."""
    seed = outcome.cfg.seed
    if not outcome.failure:
        print(f"ok seed={seed} {outcome.seconds:.1f}s {outcome.summary}", flush=True)
        return False
    print(f"FAILED seed={seed}: {outcome.failure}", file=sys.stderr)
    for line in outcome.history:
        print(f"  {line}", file=sys.stderr)
    print(f"replay: {replay_command(outcome.cfg, outcome.step + 1)}", file=sys.stderr, flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    configs = [
        SimConfig(
            seed=seed,
            steps=args.steps,
            connections=args.connections,
            block_size=args.block_size,
            blocks=args.blocks,
            flush_interval_ms=args.flush_interval_ms,
            cache_blocks=args.cache_blocks,
            faults=args.faults,
            encrypted=args.encrypted,
        )
        for seed in range(args.seed, args.seed + args.seeds)
    ]
    started = time.monotonic()
    if args.jobs > 1:
        level = logging.WARNING if args.verbose else logging.CRITICAL
        with multiprocessing.get_context("spawn").Pool(
            args.jobs, initializer=quiet_logging, initargs=(level,)
        ) as pool:
            outcomes = pool.imap_unordered(run_one, configs)
            failures = sum(report(outcome) for outcome in outcomes)
    else:
        failures = sum(report(run_one(cfg)) for cfg in configs)
    if len(configs) > 1:
        print(
            f"summary: {len(configs)} seeds from {args.seed}, {failures} failed, "
            f"{time.monotonic() - started:.0f}s, {args.jobs} process(es)"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
