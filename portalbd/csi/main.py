"""``portalbd-csi``: the Kubernetes CSI driver's command line and gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc

from portalbd import __version__
from portalbd.csi.proto import csi_pb2_grpc as pb_grpc

log = logging.getLogger("portalbd.csi")

DESCRIPTION = """\
Kubernetes CSI driver for portalbd: volumes and snapshots kept in SlateDB under
a root URL (a local directory or an S3 prefix), served on each node by a
supervised portalbd daemon.

examples:
  portalbd-csi --endpoint unix:///csi/csi.sock --root s3://bucket/k8s --mode controller
  portalbd-csi --endpoint unix:///csi/csi.sock --root file:///var/lib/portalbd-csi --mode all
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portalbd-csi",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--version", action="version", version=f"portalbd-csi {__version__}")
    add("--endpoint", required=True, metavar="unix:///PATH", help="gRPC endpoint to serve")
    add("--root", required=True, metavar="URL", help="file:///abs/dir or s3://bucket/prefix")
    add("--node-id", metavar="ID", help="this node's name (default: the hostname)")
    add("--mode", choices=("controller", "node", "all"), default="all", help="services to run")
    add(
        "--state-dir",
        type=Path,
        default=Path("/run/portalbd/csi"),
        metavar="DIR",
        help="per-volume sockets, FUSE mounts and logs on this node (default /run/portalbd/csi)",
    )
    add("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def endpoint_path(endpoint: str) -> Path:
    prefix = "unix://"
    if not endpoint.startswith(prefix) or not endpoint[len(prefix) :].startswith("/"):
        raise ValueError(f"--endpoint {endpoint!r}: use unix:///absolute/path.sock")
    return Path(endpoint[len(prefix) :])


async def serve(args: argparse.Namespace) -> int:
    from portalbd.csi.controller import ControllerService
    from portalbd.csi.identity import IdentityService
    from portalbd.csi.node import NodeService, have_tools
    from portalbd.csi.volumes import Registry

    path = endpoint_path(args.endpoint)
    registry = Registry(args.root)
    server = grpc.aio.server()
    controller = args.mode in ("controller", "all")
    pb_grpc.add_IdentityServicer_to_server(IdentityService(controller=controller), server)
    if controller:
        pb_grpc.add_ControllerServicer_to_server(ControllerService(registry), server)
    node: NodeService | None = None
    if args.mode in ("node", "all"):
        missing = have_tools()
        if missing:
            log.warning("node tools missing: %s (staging will fail)", ", ".join(missing))
        node = NodeService(registry, args.node_id or socket.gethostname(), args.state_dir)
        pb_grpc.add_NodeServicer_to_server(node, server)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from an earlier run
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    # In the background, each volume under its lock: RPCs are answered meanwhile.
    adopting = asyncio.create_task(node.adopt_staged()) if node is not None else None
    log.info(
        "portalbd-csi %s serving mode=%s endpoint=%s root=%s",
        __version__,
        args.mode,
        path,
        args.root,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down; staged volumes keep serving")
    await server.stop(grace=5)
    if adopting is not None:
        adopting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await adopting
    if node is not None:
        await node.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        endpoint_path(args.endpoint)
        if not args.root.startswith(("file:///", "s3://")):
            raise ValueError(f"--root {args.root!r}: use file:///abs/dir or s3://bucket/prefix")
    except ValueError as exc:
        print(f"portalbd-csi: {exc}", file=sys.stderr)
        return 2
    if args.mode != "controller" and os.geteuid() != 0:
        log.warning("the node service mounts filesystems and needs root")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
