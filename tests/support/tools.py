"""The system tools tests drive (mount, losetup, fusermount3, ...), through ``sh``.

Two ways to run one, so each test module need not write its own: `run` for
a step the test needs (a failure fails the test, with the tool's output), and
`quiet` for cleanup, which must carry on whatever one step did.
"""

from __future__ import annotations

import sh


def run(*argv: str, timeout: float = 120) -> str:
    """The tool's stdout; AssertionError with its output if it fails."""
    try:
        return str(sh.Command(argv[0])(*argv[1:], _timeout=timeout, _tty_out=False))
    except sh.ErrorReturnCode as exc:
        out = (exc.stdout + exc.stderr).decode(errors="replace")
        raise AssertionError(f"{argv}: {out}") from None


def quiet(*argv: str, timeout: float = 60) -> bool:
    """Run a cleanup step, whatever its outcome: whether it succeeded."""
    try:
        sh.Command(argv[0])(*argv[1:], _timeout=timeout, _tty_out=False)
    except sh.ErrorReturnCode:
        return False
    return True
