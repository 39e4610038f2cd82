"""Structured logs: one line per event, ``key=value`` pairs, to stderr.

The daemon also keeps its most recent records in memory (`RecentLog`), so
the control protocol's ``Log`` request can hand them to portalctl and the
TUI without either reading the journal or a file the daemon may not have.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections import deque
from typing import Any

# What `Log` can return: enough to see what led up to a problem, small
# enough (with MAX_MESSAGE) to stay far below the reply limit.
RECENT_LINES = 500
# One record's message (a traceback included) is cut at this many characters.
MAX_MESSAGE = 4000


class _Formatter(logging.Formatter):
    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        line = (
            f"{stamp}.{millis:03d}Z {record.levelname.lower():7s} "
            f"instance={self.instance} {record.name}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RecentLog(logging.Handler):
    """The last `capacity` records, as the ``Log`` request returns them.

    Bounded in count and in each message's length, so a chatty debug log
    costs at most a few MB. Records come from the event loop and from worker
    threads; the handler's lock guards the ring (held for an append or a copy).
    """

    def __init__(self, capacity: int = RECENT_LINES) -> None:
        super().__init__()
        self.capacity = capacity
        self._entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = itertools.count()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            if len(message) > MAX_MESSAGE:
                message = message[: MAX_MESSAGE - 1] + "…"
            entry = {
                "seq": next(self._seq),
                # whole milliseconds, the ones the stderr line shows
                "time": round(int(record.created) + int(record.msecs) / 1000, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            }
        except Exception:  # as logging's own handlers do: a bad record must not raise
            self.handleError(record)
            return
        self.acquire()
        try:
            self._entries.append(entry)
        finally:
            self.release()

    def tail(self, lines: int, after: int = -1) -> list[dict[str, Any]]:
        """The newest `lines` records with a sequence number above `after`, oldest first."""
        self.acquire()
        try:
            newer = [e for e in self._entries if e["seq"] > after]
        finally:
            self.release()
        return newer[-lines:] if lines > 0 else []


# The daemon's ring: one per process, as a daemon serves one instance.
recent = RecentLog()


def setup(level: str, instance: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(instance))
    root = logging.getLogger()
    root.handlers[:] = [handler, recent]
    root.setLevel(level.upper())


def entry_line(entry: dict[str, Any]) -> str:
    """A ``Log`` entry as the daemon's stderr has it (without the instance, known here)."""
    created = float(entry.get("time", 0.0))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    millis = round(created % 1 * 1000) % 1000  # whole milliseconds, give or take float error
    level = str(entry.get("level", ""))
    return f"{stamp}.{millis:03d}Z {level:7s} {entry.get('logger', '')}: {entry.get('message', '')}"
