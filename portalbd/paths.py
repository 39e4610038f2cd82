"""Where an instance's control socket and object cache live by default.

One rule shared by the daemon, portalctl, the TUI and the NixOS module, so
that ``--instance NAME`` finds the same socket everywhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

SOCKET_NAME = "control.sock"
# The original portalbd's one control socket (its default, and what its
# README's config names, under [nbd]).
ORIGINAL_CONTROL_SOCKET = Path("/run/portalbd/portalbd.sock")


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


def object_cache_root(
    instance: str, env: Mapping[str, str] | None = None, uid: int | None = None
) -> Path:
    """Default directory of the local object cache of an S3 disk.

    systemd's ``CACHE_DIRECTORY`` (the unit's ``CacheDirectory=``) wins;
    else /var/cache/portalbd/INSTANCE for root, else the user's XDG cache.
    Each disk caches under its own id below this (store/instance.py), so a
    disk deleted and made again at the same URL never reads the old one's
    objects.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    cache_directory = env.get("CACHE_DIRECTORY")
    if cache_directory:
        return Path(cache_directory.split(":")[0])
    if uid == 0:
        return Path("/var/cache/portalbd") / instance
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", f"/tmp/portalbd-{uid}")) / ".cache"
    return base / "portalbd" / instance


def original_control_socket(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """Where a config written for the original gets its control socket here.

    The original's path itself for root outside systemd; under systemd the
    unit's runtime directory, otherwise this user's runtime base, so the
    same config also runs unprivileged. portalctl with no ``--socket`` or
    ``--instance`` looks here when the default instance is not running.
    """
    env = os.environ if env is None else env
    runtime_directory = env.get("RUNTIME_DIRECTORY")
    if runtime_directory:
        return Path(runtime_directory.split(":")[0]) / ORIGINAL_CONTROL_SOCKET.name
    return runtime_base(env, uid) / ORIGINAL_CONTROL_SOCKET.name


def discovery_roots(env: Mapping[str, str] | None = None, uid: int | None = None) -> list[Path]:
    """Directories whose ``*/control.sock`` children are portalbd instances.

    Every base :func:`runtime_base` can choose, not only this user's: root's
    daemons live in /run/portalbd, and a daemon started where
    XDG_RUNTIME_DIR was unset (cron, sudo, a container) uses /tmp/portalbd-UID
    even when this shell has one.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    roots = [Path("/run/portalbd")]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        roots.append(Path(runtime) / "portalbd")
    roots.append(Path(f"/tmp/portalbd-{uid}"))
    return roots


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def scan_roots(roots: Iterable[Path]) -> list[Path]:
    """Sockets present now under the roots, sorted; unreadable roots are skipped.

    A few ``stat`` calls: cheap enough for the TUI to repeat every refresh,
    so that new instances appear on their own.
    """
    found: set[Path] = set()
    for root in roots:
        try:
            children = list(root.iterdir())
        except OSError:
            continue
        for child in children:
            candidate = child / SOCKET_NAME
            if is_socket(candidate):
                found.add(candidate)
    return sorted(found)


def discover_sockets(env: Mapping[str, str] | None = None) -> list[Path]:
    """Control sockets of instances on this host, for the TUI and portalctl."""
    return scan_roots(discovery_roots(env))
