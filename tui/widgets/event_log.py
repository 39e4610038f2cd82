"""The instance's recent events, newest at the bottom."""

from __future__ import annotations

from textual.events import Resize
from textual.widgets import RichLog

from tui.model import EVENT_LINES, Instance
from tui.view import event_text


class EventLog(RichLog):
    DEFAULT_CSS = """
    EventLog {
        border: round $foreground 30%;
        border-title-color: $text-accent;
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        # min_width=1: RichLog wraps at 78 columns by default whatever its own
        # width, so in a narrower panel the end of a long error was cut off.
        super().__init__(id=id, max_lines=EVENT_LINES, wrap=True, markup=False, min_width=1)
        self.border_title = "Events"
        self._shown: tuple[int, int] = (0, 0)  # (id of the deque, events shown)
        self._inst: Instance | None = None
        self._width = 0

    def show(self, inst: Instance) -> None:
        """Append what is new since the last call; events only ever get appended."""
        self._inst = inst
        events = list(inst.events)
        ident, shown = self._shown
        if ident != id(inst.events) or shown > inst.event_total:
            self.clear()
            shown = max(0, inst.event_total - len(events))
        new = inst.event_total - shown
        for event in events[max(0, len(events) - new) :] if new > 0 else []:
            self.write(event_text(event))
        self._shown = (id(inst.events), inst.event_total)

    def on_resize(self, event: Resize) -> None:
        """Lines are wrapped when written: wrap them all again at the new width."""
        width, self._width = self._width, event.size.width
        if self._size_known and width != event.size.width and self._inst is not None:
            self._shown = (0, 0)
            self.show(self._inst)
