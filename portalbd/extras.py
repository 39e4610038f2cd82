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


# Modules no extra can provide: they come with a system package.
SYSTEM_MODULES = {
    "nbd": (
        "libnbd's Python module (nbd), which is not installed; it ships with libnbd, "
        "not on PyPI: apt install python3-libnbd (Debian, Ubuntu), "
        "dnf install python3-libnbd (Fedora), or the libnbd package of your distribution"
    ),
}


def missing_extra_message(exc: ImportError, tool: str) -> str | None:
    """The message for an import that failed because an extra is missing.

    None when the missing module is not one an extra provides (a real bug,
    which should surface as it is).
    """
    root = (exc.name or "").split(".")[0]
    if root in SYSTEM_MODULES:
        return f"{tool} needs {SYSTEM_MODULES[root]}"
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return (
        f"{tool} needs portalbd's [{extra}] extra, and {root} is not installed: "
        f"pip install 'portalbd[{extra}]'"
    )
