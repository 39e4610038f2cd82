"""Named crash points for tests: ``PORTALBD_FAULT=restore:after-clone``.

The crash tests need the daemon to die at an exact step of a multi-step
operation, which a SIGKILL from outside only hits by luck. When the
environment names a point (comma-separated for several), the process exits
there at once, like a power cut: no cleanup, no flush. Unset, each point
costs one dictionary lookup.
"""

from __future__ import annotations

import os

EXIT_CODE = 86


def crash_point(name: str) -> None:
    wanted = os.environ.get("PORTALBD_FAULT")
    if wanted and name in wanted.split(","):
        os.write(2, f"portalbd: PORTALBD_FAULT crash at {name}\n".encode())
        os._exit(EXIT_CODE)
