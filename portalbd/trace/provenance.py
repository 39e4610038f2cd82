"""Which portalbd a bench measured: version, git commit, and another checkout's daemon.

A result without this cannot be read later: two reports a month apart, or a
before/after pair, only mean something if they say which code ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import portalbd
from portalbd.launch import LaunchError

# This checkout (the tree the running `portalbd-trace` imports portalbd from).
HERE = Path(portalbd.__file__).resolve().parents[1]


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes `python -m portalbd.daemon` import `tree`'s package.

    PYTHONSAFEPATH keeps the daemon's working directory off sys.path, so a
    checkout there cannot shadow the tree asked for.
    """
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def commit(tree: Path) -> str | None:
    """`git describe`-like: the short commit, "+dirty" with uncommitted changes; None if not git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short=10", "HEAD"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def check_baseline(tree: Path) -> Path:
    """`tree` resolved, once it is known that its daemon would run its own package.

    Raises LaunchError saying why not: not a checkout, $PORTALBD_BIN set (it
    would replace the baseline's daemon too), or another portalbd imported.
    """
    if not (tree / "portalbd" / "daemon.py").is_file():
        raise LaunchError(f"--baseline {tree}: not a portalbd checkout (no portalbd/daemon.py)")
    if os.environ.get("PORTALBD_BIN"):
        raise LaunchError(
            "--baseline runs the checkout's package with this Python; unset PORTALBD_BIN"
        )
    tree = tree.resolve()
    found = subprocess.run(
        [sys.executable, "-c", "import portalbd; print(portalbd.__file__)"],
        env={**os.environ, **tree_env(tree)},
        cwd=tree.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    path = found.stdout.strip()
    if found.returncode != 0 or not Path(path).resolve().is_relative_to(tree):
        detail = path or (found.stderr.strip().splitlines() or ["nothing"])[-1]
        raise LaunchError(f"--baseline {tree}: its daemon would import {detail}")
    return tree
