"""Finding control sockets by the documented layout, without asking anyone.

The rule is the daemon's (``portalbd.paths``): this module only names it the
way the TUI's code and configuration use it.
"""

from __future__ import annotations

from portalbd.paths import SOCKET_NAME, is_socket
from portalbd.paths import discovery_roots as default_roots
from portalbd.paths import scan_roots as scan

__all__ = ["SOCKET_NAME", "default_roots", "is_socket", "scan"]
