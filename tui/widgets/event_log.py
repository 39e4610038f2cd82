"""The instance's recent events, or the daemon's own log; newest at the bottom."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

from tui.model import DAEMON_LOG_LINES, EVENT_LINES, Instance
from tui.view import event_text, log_line_text

EVENTS = "events"
DAEMON = "daemon"
TITLES = {EVENTS: "Events", DAEMON: "Daemon log"}


class EventLog(RichLog):
    DEFAULT_CSS = """
    EventLog {
        border: round $foreground 30%;
        border-title-color: $text-accent;
        border-subtitle-color: $text-muted;
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        # min_width=1: RichLog wraps at 78 columns by default whatever its own
        # width, so in a narrower panel the end of a long error was cut off.
        super().__init__(id=id, max_lines=EVENT_LINES, wrap=True, markup=False, min_width=1)
        self.mode = EVENTS
        self.border_title = TITLES[EVENTS]
        self._shown: tuple[Any, int] = (None, 0)  # (what is shown, items shown)
        self._inst: Instance | None = None
        self._width = 0

    def set_mode(self, mode: str) -> None:
        """Show the TUI's events about the instance, or the daemon's own log."""
        self.mode = mode
        self.max_lines = EVENT_LINES if mode == EVENTS else DAEMON_LOG_LINES
        self.border_title = TITLES[mode]
        self._shown = (None, 0)
        if self._inst is not None:
            self.show(self._inst)

    def _source(self, inst: Instance) -> tuple[Sequence[Any], int, Callable[[Any], Text], str]:
        """(items, how many were ever added, how one is drawn, a note above them)."""
        if self.mode == EVENTS:
            return list(inst.events), inst.event_total, event_text, ""
        note = inst.daemon_log_note or ""
        if not note and not inst.daemon_log_total:
            note = "waiting for the daemon's log…"
        return list(inst.daemon_log), inst.daemon_log_total, log_line_text, note

    def show(self, inst: Instance) -> None:
        """Append what is new since the last call; both sources only ever get appended."""
        self._inst = inst
        items, total, draw, note = self._source(inst)
        ring = inst.events if self.mode == EVENTS else inst.daemon_log
        ident = (self.mode, id(ring), note)
        shown_ident, shown = self._shown
        if ident != shown_ident or shown > total:
            self.clear()
            if note:
                self.write(Text(note, style="italic yellow"))
            shown = max(0, total - len(items))
        new = total - shown
        for item in items[max(0, len(items) - new) :] if new > 0 else []:
            self.write(draw(item))
        self._shown = (ident, total)

    def on_resize(self, event: Resize) -> None:
        """Lines are wrapped when written: wrap them all again at the new width."""
        width, self._width = self._width, event.size.width
        if self._size_known and width != event.size.width and self._inst is not None:
            self._shown = (None, 0)
            self.show(self._inst)
