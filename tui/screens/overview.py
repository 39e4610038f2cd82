"""The first screen: one row per instance, and details of the highlighted one."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Header, Input, Static

from tui.format import fmt_count, fmt_duration, fmt_mib_s
from tui.model import Instance, State
from tui.screens.base import PortalbdScreen
from tui.view import SORT_KEYS, SortKey, matches_filter, sort_arrow, sort_instances, summary_lines
from tui.widgets.chart import Chart
from tui.widgets.tables import InstanceTable


class OverviewScreen(PortalbdScreen):
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    AUTO_FOCUS = "#instances"  # not the (hidden) filter box, which would eat every key
    BINDINGS = [
        Binding("enter", "open", "Open", priority=True),
        Binding("c", "create_snapshot", "Snapshot"),
        Binding("r,f5", "app.refresh", "Refresh", key_display="r/f5"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse the sort", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        self.sort_index = 0  # into SORT_KEYS: by name until `s`
        self.sort_reverse = False

    @property
    def sort_key(self) -> SortKey:
        return SORT_KEYS[self.sort_index]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter: part of a name, storage URL, socket or state", id="filter")
        yield InstanceTable(id="instances")
        yield Static(id="empty")
        with Vertical(id="details"):
            yield Static(id="facts")
            yield Chart("Throughput (read + write)", id="trend")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(InstanceTable).border_title = "Instances"

    def on_resize(self) -> None:
        self.render_fleet()

    def render_fleet(self) -> None:
        app = self.portalbd
        every = app.fleet.sorted()
        shown = [i for i in every if matches_filter(i, self.filter_text)]
        instances = sort_instances(shown, self.sort_key, self.sort_reverse)
        table = self.query_one(InstanceTable)
        arrow = sort_arrow(self.sort_key, self.sort_reverse)
        table.show(instances, self.size.width, (arrow, *sorted(self.sort_key.columns)))
        up = sum(1 for i in every if i.state is State.UP)
        self.sub_title = f"{len(every)} instance{'s' if len(every) != 1 else ''}, {up} up"
        if self.filter_text:
            self.sub_title += f", {len(instances)} shown"
            table.border_title = f"Instances matching {self.filter_text!r}"
        else:
            table.border_title = "Instances"
        # Said in the border too: the sorted column may not fit the width.
        table.border_subtitle = f"sorted by {self.sort_key.label} {arrow}"
        empty = self.query_one("#empty", Static)
        empty.display = not instances
        self.query_one("#details").display = bool(instances)
        table.display = bool(instances)
        if every and not instances:
            empty.update(
                Text.assemble(
                    (f"No instance matches {self.filter_text!r}.\n\n", "bold"),
                    "escape clears the filter.",
                )
            )
            return
        if not instances:
            roots = ", ".join(f"{r}/*/control.sock" for r in app.settings.roots)
            empty.update(
                Text.assemble(
                    ("No portalbd instances found.\n\n", "bold"),
                    f"Looking in {roots}" if app.settings.discover else "Discovery is off",
                    " and at the --socket paths given. New instances appear here on their own.",
                )
            )
            return
        inst = self.highlighted()
        if inst is not None:
            self._show_details(inst)

    def _show_details(self, inst: Instance) -> None:
        self.query_one("#facts", Static).update(Text("\n").join(summary_lines(inst)))
        rates = inst.rates if inst.state is State.UP else None
        value = Text.assemble(
            ("read ", "dim"),
            fmt_mib_s(rates.read_bps if rates else None),
            ("  write ", "dim"),
            fmt_mib_s(rates.write_bps if rates else None),
            (" MiB/s   IOPS ", "dim"),
            fmt_count(rates.total_iops if rates else None),
        )
        data = list(inst.history.total_bps)
        peak = f"{fmt_mib_s(max(data))} MiB/s" if data else ""
        span = f"last {fmt_duration(len(data) * self.portalbd.settings.refresh_s)}"
        self.query_one("#trend", Chart).show(data, value, peak, span if data else "")

    def highlighted(self) -> Instance | None:
        key = self.query_one(InstanceTable).highlighted_key()
        return self.portalbd.fleet.get(key) if key is not None else None

    @on(DataTable.RowHighlighted)
    def _highlighted(self, _: DataTable.RowHighlighted) -> None:
        inst = self.highlighted()
        if inst is not None:
            self._show_details(inst)

    @on(DataTable.RowSelected)
    def _selected(self, _: DataTable.RowSelected) -> None:
        self.action_open()

    def action_sort(self) -> None:
        """Next sort column, in its natural direction (numbers biggest first)."""
        self.sort_index = (self.sort_index + 1) % len(SORT_KEYS)
        self.sort_reverse = False
        self.render_fleet()

    def action_reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.render_fleet()

    @on(DataTable.HeaderSelected)
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts by it; a second click reverses."""
        column = str(event.column_key.value)
        for index, key in enumerate(SORT_KEYS):
            if column in key.columns:
                if index == self.sort_index:
                    self.sort_reverse = not self.sort_reverse
                else:
                    self.sort_index, self.sort_reverse = index, False
                self.render_fleet()
                return

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""  # Input.Changed re-renders the table
        box.display = False
        self.query_one(InstanceTable).focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.render_fleet()

    def action_open(self) -> None:
        from tui.screens.instance import InstanceScreen

        box = self.query_one("#filter", Input)
        if box.has_focus:  # enter in the filter keeps it and goes back to the table
            box.display = bool(self.filter_text)
            self.query_one(InstanceTable).focus()
            return
        inst = self.highlighted()
        if inst is not None:
            self.app.push_screen(InstanceScreen(inst.key))

    def action_create_snapshot(self) -> None:
        inst = self.highlighted()
        if inst is not None:
            self.portalbd.ask_create_snapshot(inst)
