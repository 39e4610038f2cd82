"""Finding control sockets by the documented layout, without asking anyone.

Daemons run as root put their socket in `/run/portalbd/<instance>/`, user
daemons in `$XDG_RUNTIME_DIR/portalbd/<instance>/`, or `/tmp/portalbd-<uid>/`
where XDG_RUNTIME_DIR was unset (the rule of `portalbd.paths`). Scanning is a
few `stat` calls, cheap enough to repeat every refresh so that new instances
appear on their own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

SOCKET_NAME = "control.sock"


def default_roots(env: Mapping[str, str] | None = None, uid: int | None = None) -> list[Path]:
    """Directories whose `*/control.sock` children are portalbd instances."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    roots = [Path("/run/portalbd")]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        roots.append(Path(runtime) / "portalbd")
    # Always: a daemon started where XDG_RUNTIME_DIR was unset (cron, sudo, a
    # container) puts its socket here even when this shell has one.
    roots.append(Path(f"/tmp/portalbd-{uid}"))
    return roots


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def scan(roots: Iterable[Path]) -> list[Path]:
    """Sockets present now under the roots, sorted; unreadable roots are skipped."""
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
