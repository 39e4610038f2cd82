"""`portalbd-trace`: inspect, convert, replay, benchmark and generate traces."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from portalbd import __version__
from portalbd.extras import missing_extra_message

T = TypeVar("T")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}  # fmt: skip


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '1M' -> bytes (binary units)."""
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    if not num.isdigit() or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 1M)")
    return int(num) * _UNITS[unit]


def _list_of(conv: Callable[[str], T]) -> Callable[[str], list[T]]:
    def parse(text: str) -> list[T]:
        return [conv(item) for item in text.split(",") if item.strip()]

    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _storage(text: str) -> str:
    if text not in ("memory", "file", "s3"):
        raise argparse.ArgumentTypeError(f"storage must be memory, file or s3, not {text!r}")
    return text


CONNECTIONS_HELP = (
    "NBD connections to replay on, as nbd-client -C N: recorded connections are folded "
    "onto at most N, and a trace recorded on fewer is spread over N"
)


def _json_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json`` prints JSON to stdout, as in portalctl; ``--json-out`` writes a file."""
    parser.add_argument("--json", action="store_true", help=f"print the {what} as JSON on stdout")
    parser.add_argument("--json-out", metavar="FILE", help=f"write the {what} as JSON to FILE")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portalbd-trace", description=__doc__)
    p.add_argument("--version", action="version", version=f"portalbd-trace {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="summarise a trace")
    info.add_argument("trace", type=Path)
    info.add_argument(
        "--json", action="store_true", help="print the summary as JSON (durations in ns)"
    )

    imp = sub.add_parser("import", help="convert an original portalbd trace JSON to JSON lines")
    imp.add_argument("src", type=Path)
    imp.add_argument("dest", type=Path, help="output; .zst or .gz compresses")

    exp = sub.add_parser("export", help="write a trace in the original portalbd JSON format")
    exp.add_argument("src", type=Path)
    exp.add_argument("dest", type=Path)

    rp = sub.add_parser("replay", help="replay a trace against an NBD server")
    rp.add_argument("trace", type=Path)
    rp.add_argument("--uri", required=True, help="nbd://HOST:PORT[/EXPORT]")
    rp.add_argument(
        "--speed", type=float, default=None,
        help="keep recorded timing, scaled by this factor (default: as fast as possible)",
    )  # fmt: skip
    rp.add_argument("-i", "--iterations", type=_int, default=1)
    rp.add_argument("-C", "--connections", type=_int, default=None, help=CONNECTIONS_HELP)
    _json_options(rp, "figures")

    b = sub.add_parser("bench", help="benchmark portalbd configurations on traces")
    b.add_argument("trace", type=Path, nargs="?")
    b.add_argument("--all", type=Path, metavar="DIR", help="every trace in DIR")
    b.add_argument("-i", "--iterations", type=_int, default=3)
    b.add_argument("--warmup", type=_int, default=1)
    b.add_argument("-C", "--connections", type=_int, default=None, help=CONNECTIONS_HELP)
    b.add_argument("--storage", type=_list_of(_storage), default=["memory"])
    b.add_argument("--block-size", type=_list_of(parse_size), default=[None])
    b.add_argument("--flush-interval-ms", type=_list_of(_int), default=[None])
    b.add_argument("--l0-sst-size", type=_list_of(parse_size), default=[None])
    b.add_argument("--max-unflushed-bytes", type=_list_of(parse_size), default=[None])
    b.add_argument("--compression", type=_list_of(str), default=[None])
    b.add_argument("--uri", help="bench this running NBD server instead of starting portalbd")
    b.add_argument("--speed", type=float, default=None)
    _json_options(b, "results")
    b.add_argument("--report", type=Path, metavar="DIR", help="write an HTML report")
    b.add_argument("--profile", type=Path, nargs="?", const=Path("profiles"), metavar="DIR",
                   help="py-spy flame graph of each daemon (default DIR: ./profiles)")  # fmt: skip
    b.add_argument("--profile-dir", type=Path, metavar="DIR",
                   help="where --profile writes (the original's flag; alone it turns "
                        "profiling on)")  # fmt: skip
    b.add_argument("--workdir", type=Path, help="keep daemon data and logs here")
    b.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also bench the daemon of this earlier checkout (e.g. git worktree "
                        "add /tmp/before REV), alternating with this one's: a before/after "
                        "table in one run")  # fmt: skip
    b.add_argument("--rounds", type=_int, default=None, metavar="N",
                   help="fresh daemons per trace, configuration and side, each "
                        "--warmup then --iterations (default: 3 with --baseline, "
                        "else 1)")  # fmt: skip
    b.add_argument("--compare", nargs=2, type=Path, metavar=("OLD.json", "NEW.json"),
                   help="a before/after table of two --json-out results, then exit")  # fmt: skip

    g = sub.add_parser("gen", help="record a trace of a real workload")
    g.add_argument("workload", choices=["mkfs", "pgbench", "minecraft"])
    g.add_argument("--out", type=Path, required=True, help="trace file (.jsonl.zst)")
    g.add_argument("--quick", action="store_true", help="shortened run (CI)")
    g.add_argument("--size", type=parse_size, default=None, help="device size")
    g.add_argument("--block-size", type=parse_size, default=None)
    g.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    g.add_argument("--server", choices=["portalbd", "nbdkit"], default="portalbd",
                   help="recording server (nbdkit: memory plugin + log filter)")  # fmt: skip
    g.add_argument("--client", choices=["fuse", "kernel"], default="fuse",
                   help="fuse: nbdfuse + loop device on this host; kernel: the Linux NBD "
                        "client in a qemu guest (mkfs only)")  # fmt: skip
    return p


def _existing(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"portalbd-trace: {path}: no such file")
    return path


def _emit_json(doc: Any, args: argparse.Namespace) -> None:
    text = json.dumps(doc, indent=1)
    if args.json:
        sys.stdout.write(text + "\n")
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


def cmd_info(args: argparse.Namespace) -> int:
    from portalbd.trace import format

    doc = format.describe(_existing(args.trace))
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(info_text(doc))
    return 0


def info_text(doc: dict[str, Any]) -> str:
    """`info` for people: sizes in binary units, the duration in seconds, not ns."""
    from portalbd.units import human_elapsed_ns, human_size

    state = "complete" if doc["complete"] else "no end record: cut short"
    conns = doc["connections"]
    lines = [
        f"{doc['path']} ({doc['format']}, {state})",
        f"  workload:   {doc['workload'] or '-'}",
        f"  disk size:  {human_size(doc['device_size_bytes'])}",
        f"  started:    {doc['start_time'] or '-'}",
        f"  duration:   {human_elapsed_ns(doc['duration_ns'])}",
        f"  requests:   {doc['ops']} on {conns} connection{'s' if conns != 1 else ''}, "
        f"{doc['errors']} failed, {doc['dropped']} dropped while recording",
    ]
    for name, count in sorted(doc["counts"].items(), key=lambda kv: -kv[1]):
        moved = doc["bytes"].get(name)
        lines.append(f"    {name:<13}{count:>9}" + (f"  {human_size(moved)}" if moved else ""))
    return "\n".join(lines) + "\n"


def cmd_import(args: argparse.Namespace) -> int:
    from portalbd.trace import format

    n = format.import_original(_existing(args.src), args.dest)
    print(f"imported {n} operations into {args.dest}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from portalbd.trace import format

    written, skipped = format.export_original(_existing(args.src), args.dest)
    note = f" ({skipped} Cache/BlockStatus/Disconnect requests left out)" if skipped else ""
    print(f"exported {written} operations to {args.dest}{note}", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from portalbd.trace import bench, format, results
    from portalbd.trace.replay import ReplayOptions, replay

    header, ops = format.load(_existing(args.trace))
    opts = ReplayOptions(speed=args.speed, connections=args.connections)
    console = bench.wide_console()
    measured = []
    for i in range(args.iterations):
        r = replay(args.uri, ops, opts)
        measured.append(r)
        console.print(
            f"iteration {i + 1}: {len(ops)} requests in {r.elapsed_ns / 1e9:.3f}s, "
            f"{r.error_count} errors, skipped {r.skipped or 'none'}"
        )
    summary = results.summarize(measured)
    run = {
        "trace": str(args.trace), "workload": header.workload, "label": f"uri {args.uri}",
        "config": {"uri": args.uri}, "iterations": args.iterations, "warmup": 0, "store": None,
        **summary,
    }  # fmt: skip
    console.print(bench.render_run(run))
    _emit_json(run, args)
    return 1 if summary["total"]["errors"] else 0


def bench_options(args: argparse.Namespace) -> Any:
    """The bench's options from its flags (the original's spellings included)."""
    from portalbd.trace import bench

    return bench.BenchOptions(
        iterations=args.iterations,
        warmup=args.warmup,
        uri=args.uri,
        profile_dir=args.profile_dir or args.profile,
        connections=args.connections,
        workdir=args.workdir,
        speed=args.speed,
        baseline=args.baseline,
        rounds=args.rounds if args.rounds is not None else (3 if args.baseline else 1),
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from portalbd.trace import bench, report, results

    console = bench.wide_console()
    if args.compare:
        old, new = (json.loads(_existing(p).read_text()) for p in args.compare)
        for name, doc in (("OLD", old), ("NEW", new)):
            try:
                results.validate(doc)
            except Exception as e:  # jsonschema.ValidationError: say which file
                raise SystemExit(f"portalbd-trace: {name} is not a bench result: {e}") from None
        Console().print(bench.compare(old, new))
        return 0
    if args.all is not None:
        traces = sorted(
            p for p in _existing(args.all).iterdir() if p.is_file() and ".json" in p.name
        )
        if not traces:
            raise SystemExit(f"portalbd-trace: no traces (*.json*) in {args.all}")
    elif args.trace is not None:
        traces = [_existing(args.trace)]
    else:
        raise SystemExit("portalbd-trace bench: give a TRACE or --all DIR")
    if args.iterations < 1 or args.warmup < 0:
        raise SystemExit("portalbd-trace bench: --iterations must be >= 1 and --warmup >= 0")
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("portalbd-trace bench: --rounds must be >= 1")
    if args.baseline is not None and args.uri is not None:
        raise SystemExit("portalbd-trace bench: --baseline starts daemons; not with --uri")
    sweep = bench.Sweep(
        storage=args.storage,
        block_size=args.block_size,
        flush_interval_ms=args.flush_interval_ms,
        l0_sst_size=args.l0_sst_size,
        max_unflushed_bytes=args.max_unflushed_bytes,
        compression=args.compression,
    )
    doc = bench.Bench(traces, sweep, bench_options(args), console).run()
    if "baseline" in doc:
        console.print(bench.baseline_table(doc))
    _emit_json(doc, args)
    if args.report:
        index = report.write(doc, args.report)
        console.print(f"report: {index}")
    return 1 if any(r["total"]["errors"] for r in doc["runs"]) else 0


def cmd_gen(args: argparse.Namespace) -> int:
    from portalbd.trace import gen

    return gen.run_generator(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": cmd_info,
    "import": cmd_import,
    "export": cmd_export,
    "replay": cmd_replay,
    "bench": cmd_bench,
    "gen": cmd_gen,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ImportError as e:
        message = missing_extra_message(e, f"portalbd-trace {args.command}")
        if message is None:
            raise
        print(f"portalbd-trace: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from portalbd.launch import LaunchError
    from portalbd.trace.format import TraceFormatError
    from portalbd.trace.replay import ReplayError

    try:
        return COMMANDS[args.command](args)
    except (TraceFormatError, ReplayError, LaunchError, OSError) as e:
        print(f"portalbd-trace: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
