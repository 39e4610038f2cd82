"""``portalbd``: the daemon's command line and lifecycle.

Start: load and check the configuration, open storage (fencing any older
writer), listen for NBD and control requests, tell systemd we are ready.
Stop (SIGTERM/SIGINT): stop accepting, let in-flight requests finish, flush
everything to the object store, close it, and say how the flush went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from portalbd import __version__, allocator, private
from portalbd import config as cfgmod
from portalbd import log as logsetup
from portalbd.config import Config, ConfigError
from portalbd.control.server import ControlServer, SocketInUse
from portalbd.instance import Instance, StartupError
from portalbd.nbd.tls import server_context
from portalbd.paths import ORIGINAL_CONTROL_SOCKET, control_socket_path, original_control_socket

log = logging.getLogger("portalbd")

EXIT_CONFIG = 2
EXIT_STARTUP = 1

DESCRIPTION = """\
Serve a virtual disk over NBD, keeping every block in SlateDB on object storage
(memory, a local directory, or an S3 bucket). Manage it with portalctl.

examples:
  portalbd --disk-size-gb 10 --storage-url file:///var/lib/portalbd/disk0
  portalbd -c /etc/portalbd/disk0.toml --nbd-address 0.0.0.0:10809
  nbdinfo nbd://127.0.0.1:10809
  portalbd --tls-certificate server-cert.pem --tls-key server-key.pem   (TLS required)
  nbdinfo 'nbds://127.0.0.1:10809/?tls-certificates=DIR'   (DIR/ca-cert.pem; docs/security.md)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portalbd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("-c", "--config", type=Path, metavar="FILE", help="TOML configuration file")
    add("--instance", metavar="NAME", help="instance name (logs, status, default paths)")
    add("--disk-size-gb", type=int, metavar="N", help="disk size in GiB (default 1)")
    add("--size-bytes", type=int, metavar="N", help="exact disk size in bytes")
    add(
        "--storage-url",
        metavar="URL",
        help="file:///abs/dir, s3://bucket/prefix, or memory:// (default: memory)",
    )
    add(
        "--encryption-key-file",
        metavar="FILE",
        help="encrypt the disk at rest with this key: 32 raw bytes or 64 hex digits "
        "(docs/security.md)",
    )
    add("--nbd-address", metavar="HOST:PORT", help='NBD TCP listener ("" to disable)')
    add("--nbd-socket", metavar="PATH", help="also listen for NBD on this Unix socket")
    add("--export-name", metavar="NAME", help="NBD export name (default portalbd)")
    add("--max-connections", type=int, metavar="N", help="NBD connections at once")
    add("--socket", metavar="PATH", help="control socket (default depends on --instance)")
    add("--block-size", type=int, metavar="BYTES", help="block size, fixed at creation")
    add("--cache-bytes", type=int, metavar="BYTES", help="clean block cache size")
    add("--dirty-bytes", type=int, metavar="BYTES", help="write-back buffer size")
    add(
        "--io-threads",
        type=int,
        metavar="N",
        help="threads that copy bytes into SlateDB off the event loop "
        "(default: one per core, at most 8; 0 = none)",
    )
    add("--flush-interval-ms", type=int, metavar="N", help="SlateDB WAL flush interval (0=manual)")
    add(
        "--read-only",
        action="store_true",
        default=None,
        help="serve another daemon's disk as a read replica: opens nothing for writing, "
        "never fences the writer, follows what it flushes",
    )
    add(
        "--snapshot",
        metavar="NAME",
        help="with --read-only: serve this snapshot instead of the live disk",
    )
    add("--log-level", choices=cfgmod.LOG_LEVELS, help="log verbosity (default info)")
    add("--trace", metavar="FILE", help="record every NBD request to this trace file")
    add("--workload", metavar="NAME", help="workload name written into the trace")
    add("--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics here")
    add("--tls-certificate", metavar="FILE", help="PEM certificate for NBD over TLS (STARTTLS)")
    add("--tls-key", metavar="FILE", help="PEM private key of --tls-certificate")
    add(
        "--tls-ca",
        metavar="FILE",
        help="PEM CA: clients must present a certificate it signed",
    )
    add(
        "--tls",
        choices=cfgmod.TLS_MODES,
        help="require (default with a certificate), allow (TLS or plain) or off",
    )
    add("--print-config", action="store_true", help="print the effective config and exit")
    add("--profile", action="store_true", help="write a CPU flame graph when stopping")
    add(
        "--profile-output",
        type=Path,
        default=Path("portalbd.svg"),
        metavar="FILE",
        help="flame graph path (default portalbd.svg)",
    )
    add("--version", action="version", version=f"portalbd {__version__}")
    return parser


# flag -> config key; applied in this order after the file is read
OVERRIDES = {
    "instance": "instance.name",
    "disk_size_gb": "device.disk_size_gb",
    "size_bytes": "device.size_bytes",
    "storage_url": "storage.url",
    "encryption_key_file": "storage.encryption_key_file",
    "nbd_address": "nbd.address",
    "nbd_socket": "nbd.socket",
    "export_name": "nbd.export_name",
    "max_connections": "nbd.max_connections",
    "socket": "socket",
    "block_size": "device.block_size",
    "cache_bytes": "device.cache_bytes",
    "dirty_bytes": "device.dirty_bytes",
    "io_threads": "device.io_threads",
    "flush_interval_ms": "lsm.flush_interval_ms",
    "read_only": "device.read_only",
    "snapshot": "device.snapshot",
    "log_level": "log_level",
    "trace": "record.path",
    "workload": "record.workload",
    "metrics_address": "metrics.address",
    "tls_certificate": "nbd.tls.certificate",
    "tls_key": "nbd.tls.key",
    "tls_ca": "nbd.tls.ca",
    "tls": "nbd.tls.mode",
}


def read_original_nbd_socket(config: Config, notes: list[str]) -> None:
    """``[nbd] socket = "/run/portalbd/portalbd.sock"`` as the original's README meant it.

    The original has no NBD Unix listener: its README's ``[nbd] socket``
    names its control socket (the original ignored the key and used that
    path by default). Here ``[nbd] socket`` is an NBD listener, so that one
    path is read as the original meant it: the control socket (unless the
    file names one at the top level, as the original did, or --socket does), and no NBD
    socket. portalctl with no flags finds it (``paths.original_control_socket``).
    """
    if config.nbd.socket != str(ORIGINAL_CONTROL_SOCKET):
        return
    config.nbd.socket = None
    if config.socket is None:
        config.socket = str(original_control_socket())
    notes.append(
        f"[nbd] socket = {str(ORIGINAL_CONTROL_SOCKET)!r} is the original portalbd's control "
        f"socket: control socket {config.socket}, no NBD Unix socket "
        "(use --nbd-socket for one)"
    )


def resolve_config(args: argparse.Namespace, notes: list[str] | None = None) -> Config:
    """The effective configuration; ``notes`` collects what is worth logging about it."""
    config = cfgmod.load(args.config) if args.config else Config()
    for flag, key in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            cfgmod.set_value(config, key, value)
    if args.nbd_socket is None:  # the flag asks for an NBD socket, wherever it is
        read_original_nbd_socket(config, [] if notes is None else notes)
    if args.disk_size_gb is not None and args.size_bytes is None:
        config.device.size_bytes = None  # the flag beats an exact size from the file
    try:
        cfgmod.validate(config)
    except ConfigError as exc:
        source = f"{args.config} + command line" if args.config else "command line"
        raise ConfigError(f"{source}: {exc}") from None
    if config.socket is None:
        config.socket = str(control_socket_path(config.instance.name))
    return config


def sd_notify(message: str) -> None:
    """Tell systemd about our state, if it is listening (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def start_metrics(instance: Instance, address: str) -> asyncio.AbstractServer:
    from portalbd.metrics import serve_metrics

    return await serve_metrics(instance, address)


def log_tasks() -> None:
    """SIGUSR1: log where every task of the loop is waiting (for a daemon that hangs)."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


async def run(config: Config, tls_context: ssl.SSLContext | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)

    assert config.socket is not None
    instance = Instance(config, Path(config.socket), tls_context)
    control = ControlServer(Path(config.socket), instance.handle)
    metrics_server: asyncio.AbstractServer | None = None
    try:
        # The control socket first: it refuses to start a second daemon on
        # the same instance before that daemon could fence the first.
        await control.start()
        await instance.open()
        await instance.listen()
        if config.metrics.address:
            metrics_server = await start_metrics(instance, config.metrics.address)
    except (StartupError, SocketInUse, OSError) as exc:
        log.error("startup failed: %s", exc)
        await control.close()
        with contextlib.suppress(Exception):
            await instance.close()
        return EXIT_STARTUP
    log.info(
        "portalbd %s started instance=%s size=%d block_size=%d storage=%s control=%s pid=%d",
        __version__,
        instance.name,
        instance.device.size if instance.device else 0,
        config.device.block_size,
        instance.location.display,
        config.socket,
        os.getpid(),
    )
    sd_notify("READY=1\nSTATUS=serving")
    trimmer = asyncio.ensure_future(allocator.trim_forever())

    fatal_waiter = asyncio.ensure_future(instance.fatal)
    stop_waiter = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {fatal_waiter, stop_waiter}
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if fatal_waiter in done:
        log.error("stopping: %s", fatal_waiter.result())
        exit_code = EXIT_STARTUP
    else:
        fatal_waiter.cancel()
        log.info("shutdown requested; draining and flushing")
    sd_notify("STOPPING=1")
    trimmer.cancel()
    if metrics_server is not None:
        metrics_server.close()
    await control.close()
    result = await instance.close()
    log.info("shutdown complete flush=%s", result)
    return exit_code if result == "ok" else EXIT_STARTUP


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notes: list[str] = []
    try:
        config = resolve_config(args, notes)
    except ConfigError as exc:
        print(f"portalbd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        sys.stdout.write(cfgmod.to_toml(config))
        return 0
    logsetup.setup(config.log_level, config.instance.name)
    for note in notes:
        log.info("%s", note)
    # Before storage opens: SlateDB's files are created with this umask.
    private.make_private()
    try:
        tls_context = server_context(config.nbd.tls)
    except ConfigError as exc:
        print(f"portalbd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    allocator.limit_arenas()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    else:
        runner = uvloop.run
    profiler = None
    if args.profile:
        from portalbd.profile import Profiler

        profiler = Profiler(args.profile_output)
        profiler.start()
    try:
        code: int = runner(run(config, tls_context))
    finally:
        if profiler is not None:
            profiler.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
