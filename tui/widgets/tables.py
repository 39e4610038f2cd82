"""The overview's instance table and the instance screen's snapshot table.

Both update in place (cell by cell, keyed by socket path or snapshot name) so
the cursor stays on its row while the data refreshes every second.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import JustifyMethod
from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from tui.model import Instance, Snapshot
from tui.view import Column, columns_for_width, row, snapshot_row


class InstanceTable(DataTable[Text]):
    DEFAULT_CSS = """
    InstanceTable { height: 1fr; }
    """
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._columns: tuple[Column, ...] = ()
        self._sorted_by: tuple[str, ...] = ()

    def column_keys(self) -> list[str]:
        return [col.key for col in self._columns]

    def show(
        self, instances: Sequence[Instance], width: int, sorted_by: tuple[str, ...] = ()
    ) -> None:
        """The rows in the order given; `sorted_by` is (arrow, column keys it marks)."""
        columns = columns_for_width(width)
        keep = self.highlighted_key()
        if (columns, sorted_by) != (self._columns, self._sorted_by):
            self.clear(columns=True)
            self._columns, self._sorted_by = columns, sorted_by
            arrow, marked = (sorted_by[0], sorted_by[1:]) if sorted_by else ("", ())
            for col in columns:
                label = f"{col.label} {arrow}" if col.key in marked else col.label
                self.add_column(Text(label, justify=_justify(col)), key=col.key)
        wanted = [inst.key for inst in instances]
        if [key.value for key in self.rows] != wanted[: self.row_count]:
            # A filter took rows away, a new instance sorts in between or
            # the sort order changed: rebuild, so the table keeps the order.
            self.clear()
        present = {key.value for key in self.rows}
        for inst in instances:
            cells = row(inst, columns)
            if inst.key not in present:
                self.add_row(*cells, key=inst.key)
                continue
            for col, cell in zip(columns, cells, strict=True):
                # Re-measuring columns costs a layout pass: only when a cell outgrows one.
                wider = cell.cell_len > self.columns[ColumnKey(col.key)].content_width
                self.update_cell(inst.key, col.key, cell, update_width=wider)
        if keep is not None and keep in self.rows:
            self.move_cursor(row=self.get_row_index(keep))

    def highlighted_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # the cursor can be out of range while rows change
            return None
        return key.value


class SnapshotTable(DataTable[Text]):
    DEFAULT_CSS = """
    SnapshotTable { height: 1fr; }
    """
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._ident: list[tuple[str, str]] = []

    def on_mount(self) -> None:
        self.add_column("Snapshot", key="name")
        self.add_column("Created", key="created")
        self.add_column(Text("Gen", justify="right"), key="generation")
        self.add_column(Text("Data", justify="right"), key="size")

    def show(self, snapshots: Sequence[Snapshot]) -> None:
        names = [s.name for s in snapshots]
        ident = [(s.name, s.id) for s in snapshots]
        if ident == self._ident:
            return
        keep = self.selected_name()
        self.clear()
        for snap in snapshots:
            self.add_row(*snapshot_row(snap), key=snap.name)
        self._ident = ident
        if keep in names:
            self.move_cursor(row=names.index(keep))

    def selected_name(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # the cursor can be out of range while rows change
            return None
        return key.value


def _justify(col: Column) -> JustifyMethod:
    return "left" if col.justify == "left" else "right"
