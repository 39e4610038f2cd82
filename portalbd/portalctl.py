"""portalctl: the operator's tool for a running portalbd.

It only speaks the control protocol (docs/control-protocol.md); everything it
can do, a script can do with ``--json`` or a plain socket. Human output keeps
the original tool's shape (``OK``, ``Snapshot: NAME``, ``Error: ...`` on
stderr with exit status 1) so habits and scripts carry over.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from portalbd import __version__
from portalbd.control.client import ControlClient
from portalbd.control.errors import ControlError, NotRunning
from portalbd.log import RECENT_LINES, entry_line
from portalbd.paths import (
    control_socket_path,
    discover_sockets,
    is_socket,
    original_control_socket,
)
from portalbd.retention import is_scheduled
from portalbd.snapshot_schedule import schedule_text
from portalbd.units import human_duration, human_latency, human_size, human_time

EXIT_OK = 0
EXIT_ERROR = 1
DEFAULT_INSTANCE = "default"


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after the command words.

    Below the top level their defaults are suppressed, so a subcommand that
    does not repeat an option leaves what the top level parsed (or its
    default) in place: ``portalctl --json snapshot list`` and ``portalctl
    snapshot list --json`` are the same request.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-s",
        "--socket",
        type=Path,
        metavar="PATH",
        default=default(None),
        help="control socket path",
    )
    where.add_argument(
        "-i",
        "--instance",
        metavar="NAME",
        default=default(None),
        help=f"find the socket of this instance (default {DEFAULT_INSTANCE!r})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the daemon's raw JSON response (for scripts)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(60.0),
        metavar="S",
        help="seconds to wait for the daemon's answer (default 60)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.socket is not None and args.instance is not None:
        parser.error("argument -i/--instance: not allowed with argument -s/--socket")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portalctl",
        description=(
            "Manage a running portalbd: status, snapshots, restore, trace recording, its log."
        ),
        epilog=(
            "examples:\n"
            "  portalctl status\n"
            "  portalctl --instance disk0 snapshot create before-upgrade\n"
            "  portalctl snapshot restore before-upgrade --force\n"
            "  portalctl record start mkfs.jsonl.zst --workload mkfs\n"
            "  portalctl log -n 20\n"
            "  portalctl --json snapshot list | jq '.SnapshotList[].name'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"portalctl {__version__}")
    add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_global_options(
        commands.add_parser("status", help="show the daemon's status and statistics"), top=False
    )
    snapshot = commands.add_parser("snapshot", help="create, list, inspect, delete, restore")
    add_global_options(snapshot, top=False)
    actions = snapshot.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help)
        add_global_options(sub, top=False)
        return sub

    action("create", "snapshot the disk now").add_argument("name")
    action("list", "list snapshots in creation order")
    action("get", "show one snapshot").add_argument("name")
    action("delete", "delete a snapshot").add_argument("name")
    restore = action("restore", "make the disk what it was at a snapshot")
    restore.add_argument("name")
    restore.add_argument(
        "--force",
        action="store_true",
        help="disconnect connected NBD clients (after flushing) instead of refusing",
    )
    logs = commands.add_parser(
        "log",
        help="print the daemon's recent log lines",
        description=(
            "Print the daemon's most recent log records (it keeps the last "
            f"{RECENT_LINES} in memory), oldest first, as its stderr has them."
        ),
    )
    add_global_options(logs, top=False)
    logs.add_argument(
        "-n",
        "--lines",
        type=int,
        default=50,
        metavar="N",
        help=f"how many of the newest lines (default 50, at most {RECENT_LINES} are kept)",
    )
    record = commands.add_parser("record", help="record every NBD request into a trace file")
    add_global_options(record, top=False)
    steps = record.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = steps.add_parser(
        "start",
        help="start recording into a new file in the instance's trace directory",
        description=(
            "Start recording every NBD request into NAME, a new file in the instance's "
            "trace directory (traces/ next to the control socket, or $STATE_DIRECTORY/traces "
            "under systemd); an existing file is never overwritten. A recording already "
            "running is stopped first. Read it with portalbd-trace info."
        ),
    )
    add_global_options(start, top=False)
    start.add_argument("name", help="file name, e.g. mkfs.jsonl.zst (.zst: compressed)")
    start.add_argument("--workload", default="unnamed", help="what the trace is of (unnamed)")
    add_global_options(steps.add_parser("stop", help="stop recording, close the file"), top=False)
    return parser


def build_request(args: argparse.Namespace) -> Any:
    if args.command == "status":
        return "Status"
    if args.command == "log":
        return {"Log": {"lines": args.lines}}
    if args.command == "record":
        if args.action == "stop":
            return "TraceStop"
        return {"TraceStart": {"path": args.name, "workload": args.workload}}
    action: str = args.action
    if action == "list":
        return "SnapshotList"
    kind = {
        "create": "SnapshotCreate",
        "get": "SnapshotGet",
        "delete": "SnapshotDelete",
        "restore": "SnapshotRestore",
    }[action]
    fields: dict[str, Any] = {"name": args.name}
    if action == "restore" and args.force:
        fields["force"] = True
    return {kind: fields}


# --- human output -----------------------------------------------------------


def print_snapshot(snap: dict[str, Any], out: TextIO) -> None:
    print(f"Snapshot: {snap.get('name')}", file=out)
    print(f"  ID:      {snap.get('id')}", file=out)
    print(f"  Created: {human_time(float(snap.get('created_at', 0)))}", file=out)
    if "size_bytes" in snap:
        print(f"  Written: {human_size(snap['size_bytes'])}", file=out)


def print_snapshot_list(snaps: list[dict[str, Any]], out: TextIO) -> None:
    if not snaps:
        print("No snapshots", file=out)
        return
    rows = [("NAME", "ID", "CREATED", "WRITTEN")]
    for s in snaps:
        size = human_size(s["size_bytes"]) if "size_bytes" in s else "-"
        rows.append(
            (str(s.get("name")), str(s.get("id")), human_time(float(s.get("created_at", 0))), size)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        # the scheduler's own snapshots, the only ones retention may prune
        mark = "  scheduled" if is_scheduled(row[0]) else ""
        print(f"{line}  {row[3]:>9}{mark}".rstrip(), file=out)


def tls_text(mode: str, client_certificates: bool) -> str:
    """How ``status`` says whether plain-text NBD clients are served."""
    text = {"require": "required", "allow": "allowed (plain text too)"}.get(mode, mode)
    if client_certificates:
        text += ", client certificates checked"
    return text


def print_status(status: dict[str, Any], out: TextIO) -> None:
    stats: dict[str, Any] = status.get("stats") or {}
    lines: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        lines.append((label, str(value)))

    if "instance" in status:
        add("Instance", status["instance"])
    if "version" in status:
        pid = f" (pid {status['pid']})" if "pid" in status else ""
        add("Version", f"{status['version']}{pid}")
    if "uptime_s" in status:
        add("Uptime", human_duration(float(status["uptime_s"])))
    if "storage_url" in status:
        generation = f" (generation {status['generation']})" if "generation" in status else ""
        add("Storage", f"{status['storage_url']}{generation}")
    if status.get("ephemeral"):
        add("Warning", "memory storage: everything on the disk is lost when the daemon exits")
    replica = status.get("replica")
    if isinstance(replica, dict):
        if replica.get("mode") == "snapshot":
            add("Replica", f"read-only, snapshot {replica.get('snapshot')}")
        else:
            add(
                "Replica",
                f"read-only, following the writer (lag under {replica.get('lag_bound_ms')} ms)",
            )
    add("Size", human_size(status.get("size_bytes", 0)))
    blocks = str(status.get("block_count"))
    if "block_size" in status:
        blocks += f" x {human_size(status['block_size'])}"
    add("Blocks", blocks)
    if "allocated_bytes" in stats:  # blocks holding data, not holes; exact
        add("Allocated", f"{human_size(stats['allocated_bytes'])} (blocks holding data)")
    elif "allocation_scan_progress" in stats:
        add("Allocated", f"counting ({float(stats['allocation_scan_progress']):.0%} scanned)")
    if "used_bytes" in stats:
        add("Used", f"{human_size(stats['used_bytes'])} in object storage (sampled every 30 s)")
    add("Snapshots", status.get("snapshot_count"))
    schedule = status.get("snapshot_schedule")
    if isinstance(schedule, dict):
        add("Schedule", schedule_text(schedule))
    nbd = status.get("nbd_address") or ""
    if status.get("nbd_socket"):
        nbd = f"{nbd} unix:{status['nbd_socket']}".strip()
    add("NBD", nbd or "-")
    if "nbd_tls" in status:
        add("TLS", tls_text(status["nbd_tls"], bool(status.get("nbd_tls_client_certificates"))))
    if "connections" in stats:
        add(
            "Clients",
            f"{stats['connections']} connected, {stats.get('connections_total', 0)} total",
        )
    commands: dict[str, int] = stats.get("commands") or {}
    if commands:
        add("Reads", f"{commands.get('read', 0)} ({human_size(stats.get('bytes_read', 0))})")
        add("Writes", f"{commands.get('write', 0)} ({human_size(stats.get('bytes_written', 0))})")
        others = [
            f"{name} {count}"
            for name, count in commands.items()
            if name not in ("read", "write") and count
        ]
        if others:
            add("Other", ", ".join(others))
    if "errors" in stats:
        add("Errors", stats["errors"])
    if "dirty_bytes" in stats:
        add("Dirty", human_size(stats["dirty_bytes"]))
    if "cached_bytes" in stats:
        add("Cached", human_size(stats["cached_bytes"]))
    if "flush_count" in stats:
        flush = str(stats["flush_count"])
        summary = stats.get("flush_latency_us") or {}
        if stats["flush_count"] and "p50" in summary:
            flush += f" (p50 {human_latency(summary['p50'])}, p99 {human_latency(summary['p99'])})"
        add("Flushes", flush)
    for command, summary in (stats.get("latency_us") or {}).items():
        if commands.get(command):
            add(
                f"Latency {command}",
                f"p50 {human_latency(summary['p50'])}  p90 {human_latency(summary['p90'])}  "
                f"p99 {human_latency(summary['p99'])}  max {human_latency(summary['max'])}",
            )
    if status.get("recording"):
        add("Recording", "yes (trace in progress)")
    width = max(len(label) for label, _ in lines) + 2
    print("portalbd daemon status:", file=out)
    for label, value in lines:
        print(f"  {(label + ':').ljust(width)}{value}", file=out)


def print_human(response: Any, out: TextIO) -> None:
    if response == "Ok":
        print("OK", file=out)
    elif isinstance(response, dict) and isinstance(response.get("Snapshot"), dict):
        print_snapshot(response["Snapshot"], out)
    elif isinstance(response, dict) and isinstance(response.get("SnapshotList"), list):
        print_snapshot_list(response["SnapshotList"], out)
    elif isinstance(response, dict) and isinstance(response.get("Status"), dict):
        print_status(response["Status"], out)
    elif isinstance(response, dict) and isinstance(response.get("Log"), list):
        for entry in response["Log"]:
            if isinstance(entry, dict):
                print(entry_line(entry), file=out)
    else:  # a response this portalctl does not know yet: show it rather than hide it
        print(json.dumps(response, indent=2), file=out)


# --- main -------------------------------------------------------------------


def resolve_socket(args: argparse.Namespace) -> Path:
    """--socket; else the instance's socket; with neither given, the default
    instance's, or the original portalbd's path when only that one runs."""
    if args.socket is not None:
        return Path(args.socket)
    path = control_socket_path(args.instance or DEFAULT_INSTANCE)
    if args.instance is None and not is_socket(path):
        original = original_control_socket()
        if is_socket(original):
            return original
    return path


def not_running_message(args: argparse.Namespace, exc: NotRunning) -> str:
    """Say which instance was looked for, and which ones do seem to run."""
    if args.socket is not None or exc.reason != "missing":
        return str(exc)
    name = args.instance or DEFAULT_INSTANCE
    message = (
        f"no portalbd instance {name!r} seems to be running: its control socket "
        f"{exc.path} does not exist (start it with `portalbd --instance {name}`, "
        "or pass --socket PATH)"
    )
    others = [p for p in discover_sockets() if p != exc.path]
    if others:
        message += "; control sockets found: " + ", ".join(str(p) for p in others)
    return message


def restore_report(client: ControlClient, name: str) -> str | None:
    """What the restore just did, from the daemon's status (the reply itself is ``Ok``)."""
    try:
        status = client.raw("Status")
    except ControlError:
        return None
    last = status.get("Status", {}).get("last_restore") if isinstance(status, dict) else None
    if not isinstance(last, dict) or last.get("name") != name:
        return None  # an older daemon, or another restore came between
    head = f"Restored {name}: now generation {last.get('generation')}, "
    paused = int(last.get("paused", 0))
    if paused:
        return (
            f"{head}I/O of {paused} client{'' if paused == 1 else 's'} paused for "
            f"{float(last.get('paused_ms', 0)):.1f} ms"
        )
    clients = int(last.get("disconnected", 0))
    return f"{head}{clients} client{'' if clients == 1 else 's'} disconnected"


def run(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    args = parse_args(argv)
    path = resolve_socket(args)
    request = build_request(args)
    report: str | None = None
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            response = client.raw(request)
            restored = args.command == "snapshot" and args.action == "restore"
            if restored and response == "Ok" and not args.json:
                report = restore_report(client, args.name)
    except NotRunning as exc:
        print(f"Error: {not_running_message(args, exc)}", file=err)
        return EXIT_ERROR
    except ControlError as exc:
        print(f"Error: {exc}", file=err)
        return EXIT_ERROR
    failed = isinstance(response, dict) and "Error" in response
    if args.json:
        print(json.dumps(response), file=out)
        return EXIT_ERROR if failed else EXIT_OK
    if failed:
        print(f"Error: {refusal_text(args, str(response['Error']))}", file=err)
        return EXIT_ERROR
    print_human(response, out)
    if report is not None:
        print(report, file=out)
    if args.command == "record" and response == "Ok":
        print(record_report(args), file=out)
    return EXIT_OK


def refusal_text(args: argparse.Namespace, message: str) -> str:
    """The daemon's error, with what to do when it is too old for the request."""
    if args.command == "log" and message.startswith("unknown request 'Log'"):
        return (
            "this daemon is older than the Log request and keeps no log to send; "
            "read its stderr (under systemd: journalctl -u the instance's unit)"
        )
    return message


def record_report(args: argparse.Namespace) -> str:
    """What `record start` / `stop` did, since the daemon's answer is a bare "Ok"."""
    if args.action == "stop":
        return "Recording stopped; the trace file is complete"
    return (
        f"Recording every NBD request into {args.name} in the instance's trace directory; "
        "stop with: portalctl record stop"
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
