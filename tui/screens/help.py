"""`?`: every key the screen underneath answers to, in one list.

Built from that screen's active bindings rather than written by hand, so a
new key cannot be missing from it (the footer shows only the main ones).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.screens.dialogs import DIALOG_CSS


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = (
        DIALOG_CSS.format(name="HelpScreen")
        + """
    HelpScreen > VerticalScroll { width: 64; max-width: 100%; height: auto; max-height: 90%;
        border: thick $primary 80%; background: $surface; padding: 1 2; }
    """
    )
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", show=False)]

    def __init__(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self._title = title
        self.rows = list(rows)

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for keys, what in self.rows:
            table.add_row(keys, what)
        with VerticalScroll():
            yield Label(Text(f"Keys: {self._title}"), classes="dialog--title")
            yield Static(table, id="help-keys", classes="dialog--body")
            yield Label(Text("escape, q or ? closes this", style="dim"))

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
