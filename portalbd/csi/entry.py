"""``portalbd-csi`` entry point: says which extra to install when gRPC is missing.

``portalbd/csi/main.py`` imports gRPC at the top, so the check has to come
before it is imported.
"""

from __future__ import annotations

import sys

from portalbd import __version__
from portalbd.extras import missing_extra_message


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:  # answered without gRPC, which the driver itself needs
        print(f"portalbd-csi {__version__}")
        return 0
    try:
        from portalbd.csi.main import main as serve_main
    except ImportError as exc:
        message = missing_extra_message(exc, "portalbd-csi")
        if message is None:
            raise
        print(f"portalbd-csi: {message}", file=sys.stderr)
        return 1
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
