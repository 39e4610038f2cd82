"""Where an instance's control socket lives by default.

One rule shared by the daemon, portalctl, the TUI and the NixOS module, so
that ``--instance NAME`` finds the same socket everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "control.sock"


def runtime_base(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The directory under which per-instance runtime directories live."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return Path("/run/portalbd")
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "portalbd"
    return Path(f"/tmp/portalbd-{uid}")


def control_socket_path(
    instance: str, env: Mapping[str, str] | None = None, uid: int | None = None
) -> Path:
    """Default control socket of a named instance.

    Under systemd (``RUNTIME_DIRECTORY`` set) the unit's runtime directory
    wins: the daemon then lives where its unit says.
    """
    env = os.environ if env is None else env
    runtime_directory = env.get("RUNTIME_DIRECTORY")
    if runtime_directory:
        return Path(runtime_directory.split(":")[0]) / SOCKET_NAME
    return runtime_base(env, uid) / instance / SOCKET_NAME


def discover_sockets(env: Mapping[str, str] | None = None) -> list[Path]:
    """Control sockets of instances on this host, for the TUI and portalctl."""
    env = os.environ if env is None else env
    bases = [Path("/run/portalbd")]
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        bases.append(Path(xdg) / "portalbd")
    bases.append(Path(f"/tmp/portalbd-{os.getuid()}"))
    found: list[Path] = []
    for base in bases:
        try:
            candidates = sorted(base.glob(f"*/{SOCKET_NAME}"))
        except OSError:
            continue
        found.extend(c for c in candidates if c.is_socket())
    return found
