"""A titled bar chart with the latest value and the peak it is scaled to."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from tui.format import bar_rows


class Bars(Widget):
    """Fills its whole size with the most recent values, one column each."""

    COMPONENT_CLASSES = {"bars--bar"}
    DEFAULT_CSS = """
    Bars { width: 1fr; height: 2; }
    Bars > .bars--bar { color: $accent; }
    """

    data: reactive[tuple[float, ...]] = reactive(tuple)

    def render(self) -> Text:
        style = self.get_component_rich_style("bars--bar")
        rows = bar_rows(self.data, self.size.width, self.size.height)
        return Text("\n".join(rows), style=style, no_wrap=True, overflow="crop")


class Chart(Vertical):
    DEFAULT_CSS = """
    Chart {
        height: auto;
        border: round $foreground 30%;
        border-title-color: $text-accent;
        border-subtitle-color: $text-muted;
        padding: 0 1;
    }
    Chart > .chart--value { height: 1; }
    """

    def __init__(self, title: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = title

    def compose(self) -> ComposeResult:
        yield Static("—", classes="chart--value")
        yield Bars()

    def show(self, data: Sequence[float], value: Text | str, peak: str = "") -> None:
        self.query_one(".chart--value", Static).update(value)
        self.query_one(Bars).data = tuple(data)
        self.border_subtitle = f"peak {peak}" if peak else ""
