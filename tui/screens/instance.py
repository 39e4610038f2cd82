"""One instance in detail: live charts, clients, snapshots and what happened lately."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Static

from tui.format import fmt_count, fmt_duration, fmt_latency_us, fmt_mib_s
from tui.model import Instance, State
from tui.screens.base import PortalbdScreen
from tui.view import summary_lines
from tui.widgets.chart import Chart
from tui.widgets.event_log import DAEMON, EVENTS, EventLog
from tui.widgets.tables import SnapshotTable


class InstanceScreen(PortalbdScreen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "create_snapshot", "New snapshot"),
        Binding("d", "delete_snapshot", "Delete"),
        Binding("r", "restore_snapshot", "Restore"),
        Binding("f5", "refresh", "Refresh"),
        # Not in the footer (full at 80 columns): the panel's border says "l: daemon log".
        Binding("l", "toggle_log", "Daemon log / events", show=False),
    ]

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="summary")
        with Horizontal(id="charts"):
            yield Chart("IOPS", id="iops")
            yield Chart("MiB/s", id="mibs")
            yield Chart("Latency p99", id="latency")
        with Horizontal(id="lower"):
            with Vertical(id="snapshots-pane"):
                yield SnapshotTable(id="snapshots")
                yield Static(id="no-snapshots")
            yield EventLog(id="events")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(SnapshotTable).focus()
        self.query_one(EventLog).border_subtitle = "l: daemon log"
        inst = self.instance
        if inst is not None:
            self.portalbd.poll(inst, snapshots=True)

    @property
    def instance(self) -> Instance | None:
        return self.portalbd.fleet.get(self.key)

    def render_fleet(self) -> None:
        inst = self.instance
        if inst is None:
            return
        self.sub_title = inst.name
        self.query_one("#summary", Static).update(Text("\n").join(summary_lines(inst)))
        live = inst.state is State.UP
        rates = inst.rates if live else None
        st = inst.status if live else None
        h = inst.history
        span = fmt_duration(len(h.total_bps) * self.portalbd.settings.refresh_s)
        iops = [r + w for r, w in zip(h.read_iops, h.write_iops, strict=True)]
        self.query_one("#iops", Chart).show(
            iops,
            _pair(
                "r",
                fmt_count(rates.read_iops if rates else None),
                "w",
                fmt_count(rates.write_iops if rates else None),
            ),
            fmt_count(max(iops)) if iops else "",
            span,
        )
        mibs = list(h.total_bps)
        self.query_one("#mibs", Chart).show(
            mibs,
            _pair(
                "r",
                fmt_mib_s(rates.read_bps if rates else None),
                "w",
                fmt_mib_s(rates.write_bps if rates else None),
            ),
            fmt_mib_s(max(mibs)) if mibs else "",
            span,
        )
        p99 = [max(r, w) for r, w in zip(h.read_p99, h.write_p99, strict=True)]
        self.query_one("#latency", Chart).show(
            p99,
            Text.assemble(
                _pair(
                    "r",
                    fmt_latency_us(st.read_latency.p99 if st else None),
                    "w",
                    fmt_latency_us(st.write_latency.p99 if st else None),
                ),
                ("  f ", "dim"),
                fmt_latency_us(st.flush_latency.p99 if st else None),
            ),
            fmt_latency_us(max(p99)) if p99 else "",
            span,
            combine="max",
        )
        snapshots = inst.snapshots or []
        pane = self.query_one("#snapshots-pane")
        pane.border_title = (
            f"Snapshots ({len(snapshots)})" if inst.snapshots is not None else ("Snapshots")
        )
        self.query_one(SnapshotTable).show(snapshots)
        hint = self.query_one("#no-snapshots", Static)
        hint.display = not snapshots
        hint.update("No snapshots yet: press c to take one." if inst.snapshots is not None else "…")
        self.query_one(EventLog).show(inst)

    def _selected(self) -> tuple[Instance, str] | None:
        inst = self.instance
        name = self.query_one(SnapshotTable).selected_name()
        if inst is None:
            return None
        if name is None:
            self.notify("No snapshot selected", severity="warning", timeout=3)
            return None
        return inst, name

    def action_create_snapshot(self) -> None:
        inst = self.instance
        if inst is not None:
            self.portalbd.ask_create_snapshot(inst)

    def action_delete_snapshot(self) -> None:
        chosen = self._selected()
        if chosen is not None:
            self.portalbd.ask_delete_snapshot(*chosen)

    def action_restore_snapshot(self) -> None:
        chosen = self._selected()
        if chosen is not None:
            self.portalbd.ask_restore_snapshot(*chosen)

    def action_toggle_log(self) -> None:
        """The panel shows the TUI's events or the daemon's log; the latter is polled meanwhile."""
        log = self.query_one(EventLog)
        daemon = log.mode == EVENTS
        log.set_mode(DAEMON if daemon else EVENTS)
        log.border_subtitle = "l: events" if daemon else "l: daemon log"
        inst = self.instance
        if inst is not None:
            self.portalbd.want_log(inst, daemon)

    def on_unmount(self) -> None:
        inst = self.instance
        if inst is not None:
            self.portalbd.want_log(inst, False)

    def action_refresh(self) -> None:
        inst = self.instance
        if inst is not None:
            self.portalbd.poll(inst, snapshots=True)


def _pair(a: str, av: str, b: str, bv: str) -> Text:
    return Text.assemble((f"{a} ", "dim"), av, (f"  {b} ", "dim"), bv)
