"""Optional dependencies: which extra installs a module, and the error that says so.

The daemon, portalctl and the TUI need none of these. Trace analysis
(pattern statistics, charts, flame graphs, result schemas) and the CSI
driver (gRPC) pull in large packages, so they are the extras ``[trace]``
and ``[csi]``; a tool that needs one says which instead of a traceback.
"""

from __future__ import annotations

EXTRA_OF_MODULE = {
    "numpy": "trace",
    "matplotlib": "trace",
    "jsonschema": "trace",
    "grpc": "csi",
    "google": "csi",  # protobuf
}


def missing_extra_message(exc: ImportError, tool: str) -> str | None:
    """The message for an import that failed because an extra is missing.

    None when the missing module is not one an extra provides (a real bug,
    which should surface as it is).
    """
    root = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return (
        f"{tool} needs portalbd's [{extra}] extra, and {root} is not installed: "
        f"pip install 'portalbd[{extra}]'"
    )
