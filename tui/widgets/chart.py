"""A titled bar chart with the latest value and the peak it is scaled to."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from tui.format import bar_rows, resample


class Bars(Widget):
    """Fills its whole size with the most recent values, one column each."""

    COMPONENT_CLASSES = {"bars--bar"}
    DEFAULT_CSS = """
    Bars { width: 1fr; height: 2; }
    Bars > .bars--bar { color: $accent; }
    """

    data: reactive[tuple[float, ...]] = reactive(tuple)
    combine: reactive[str] = reactive("mean")

    def render(self) -> Text:
        style = self.get_component_rich_style("bars--bar")
        width = self.size.width
        rows = bar_rows(resample(self.data, width, self.combine), width, self.size.height)
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

    def show(
        self,
        data: Sequence[float],
        value: Text | str,
        peak: str = "",
        span: str = "",
        combine: str = "mean",
    ) -> None:
        """Chart all of `data`; `span` says how much time that is, `combine` how
        samples sharing a column are merged ("mean" or "max")."""
        self.query_one(".chart--value", Static).update(value)
        bars = self.query_one(Bars)
        bars.combine = combine
        bars.data = tuple(data)
        self.border_subtitle = " · ".join(x for x in (f"peak {peak}" if peak else "", span) if x)
