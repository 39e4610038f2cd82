"""``portalbd-dst``: run seeded simulations; on failure, say how to replay."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from portalbd.dst.sim import SimConfig, SimulationFailure, run_simulation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portalbd-dst",
        description="Deterministic simulation of portalbd: seeded I/O, snapshots, "
        "restores and crashes against an oracle of the disk.",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed")
    parser.add_argument("--steps", type=int, default=300, help="operations per seed")
    parser.add_argument("--connections", type=int, default=3, help="NBD connections")
    parser.add_argument("--block-size", type=int, default=4096, help="device block size")
    parser.add_argument("--blocks", type=int, default=48, help="device size in blocks")
    parser.add_argument(
        "--flush-interval-ms", type=int, default=0, help="SlateDB WAL flush interval (0=manual)"
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
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    failures = 0
    for seed in range(args.seed, args.seed + args.seeds):
        cfg = SimConfig(
            seed=seed,
            steps=args.steps,
            connections=args.connections,
            block_size=args.block_size,
            blocks=args.blocks,
            flush_interval_ms=args.flush_interval_ms,
        )
        started = time.monotonic()
        try:
            stats = run_simulation(cfg)
        except SimulationFailure as exc:
            failures += 1
            print(f"FAILED seed={seed}: {exc.message}", file=sys.stderr)
            for line in exc.history:
                print(f"  {line}", file=sys.stderr)
            print(f"replay: {replay_command(cfg, exc.step + 1)}", file=sys.stderr)
            continue
        print(f"ok seed={seed} {time.monotonic() - started:.1f}s {stats.summary()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
