"""Reading the daemon's answers, the same way in every client.

Pure: the clients hand over the line they read and get back the decoded
reply or one of the errors in `portalbd.control.errors`.
"""

from __future__ import annotations

import json
from typing import Any

from portalbd.control.errors import DaemonError, ProtocolError

# Replies can be long (a SnapshotList of thousands); requests stay small.
MAX_REPLY = 16 * 1024 * 1024


def too_long() -> ProtocolError:
    return ProtocolError(f"reply longer than {MAX_REPLY} bytes")


def decode(line: bytes) -> Any:
    """One reply line (without its newline) as JSON, ``{"Error": ...}`` included."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError(f"reply is not JSON: {line[:80]!r}") from None


def refusal(reply: Any) -> DaemonError | None:
    """The daemon's ``{"Error": ...}`` as an exception, or None for any other reply."""
    if isinstance(reply, dict) and "Error" in reply:
        return DaemonError(str(reply["Error"]))
    return None


def tagged(reply: Any, tag: str, kind: type) -> Any:
    """The body of ``{tag: body}`` when body is a ``kind``; anything else is a protocol error."""
    if isinstance(reply, dict) and isinstance(reply.get(tag), kind):
        return reply[tag]
    raise ProtocolError(f"expected {tag}, got {str(reply)[:80]}")


def ok(reply: Any) -> None:
    if reply != "Ok":
        raise ProtocolError(f"expected Ok, got {str(reply)[:80]}")
