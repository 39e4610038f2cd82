"""Pure presentation: an `Instance` in, Rich `Text` cells and lines out.

Kept apart from the widgets so the tables' contents can be unit-tested without
running an app, and so both screens describe an instance the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text

from portalbd.control.protocol import snapshot_name_problem as daemon_name_problem
from tui.format import (
    DASH,
    ellipsize,
    fmt_bytes,
    fmt_clock,
    fmt_count,
    fmt_duration,
    fmt_latency_us,
    fmt_mib_s,
    fmt_time,
    resample,
    sparkline,
)
from tui.model import Event, Instance, LogLine, Snapshot, State, Status

STATE_LABEL = {
    State.UP: "● up",
    State.CONNECTING: "○ connecting",
    State.UNRESPONSIVE: "◐ unresponsive",
    State.DOWN: "✕ down",
}
EVENT_STYLE = {"info": "", "warning": "bold yellow", "error": "bold red"}


def state_text(inst: Instance) -> Text:
    # Rich styles cannot use Textual's $variables; these read on light and dark.
    colour = {
        State.UP: "green",
        State.CONNECTING: "dim",
        State.UNRESPONSIVE: "yellow",
        State.DOWN: "red",
    }[inst.state]
    return Text(STATE_LABEL[inst.state], style=f"bold {colour}")


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    cell: Callable[[Instance], Text | str]
    justify: str = "right"


def _st(inst: Instance) -> bool:
    return inst.status is not None and inst.state is State.UP


def _size(inst: Instance) -> str:
    return fmt_bytes(inst.status.size_bytes) if inst.status else DASH


def _used(inst: Instance) -> str:
    return fmt_bytes(inst.status.used_bytes) if inst.status else DASH


def _allocated(inst: Instance) -> str:
    return fmt_bytes(inst.status.allocated_bytes) if inst.status else DASH


def _clients(inst: Instance) -> str:
    return str(inst.status.connections) if _st(inst) and inst.status else DASH


def _rate(
    get: Callable[[Instance], float], fmt: Callable[[float | None], str]
) -> Callable[[Instance], str]:
    def cell(inst: Instance) -> str:
        return fmt(get(inst)) if inst.rates is not None and inst.state is State.UP else DASH

    return cell


def _pair(a: Callable[[Instance], str], b: Callable[[Instance], str]) -> Callable[[Instance], str]:
    def cell(inst: Instance) -> str:
        left, right = a(inst), b(inst)
        return DASH if left == DASH else f"{left}/{right}"

    return cell


_r_iops = _rate(lambda i: i.rates.read_iops if i.rates else 0.0, fmt_count)
_w_iops = _rate(lambda i: i.rates.write_iops if i.rates else 0.0, fmt_count)
_r_mib = _rate(lambda i: i.rates.read_bps if i.rates else 0.0, fmt_mib_s)
_w_mib = _rate(lambda i: i.rates.write_bps if i.rates else 0.0, fmt_mib_s)


def _flush_p99(inst: Instance) -> str:
    return fmt_latency_us(inst.status.flush_latency.p99) if _st(inst) and inst.status else DASH


def _dirty(inst: Instance) -> str:
    return fmt_bytes(inst.status.dirty_bytes) if _st(inst) and inst.status else DASH


def _snaps(inst: Instance) -> str:
    return str(inst.status.snapshot_count) if inst.status else DASH


def _trend(width: int) -> Callable[[Instance], Text]:
    def cell(inst: Instance) -> Text:
        return Text(sparkline(resample(inst.history.total_bps, width), width), style="cyan")

    return cell


def _name(inst: Instance) -> Text:
    return Text(ellipsize(inst.name, INSTANCE_NAME_CELL), style="bold")


def _url(width: int) -> Callable[[Instance], str]:
    def cell(inst: Instance) -> str:
        url = inst.status.storage_url if inst.status else ""
        return ellipsize(url, width) if url else DASH

    return cell


# Longer names are cut with an ellipsis in the table (the dialogs say them whole).
SNAPSHOT_NAME_CELL = 40
# Instance names have no length limit; the details panel says them whole.
INSTANCE_NAME_CELL = 24


NAME = Column("name", "Instance", _name, "left")
STATE = Column("state", "State", state_text, "left")
SIZE = Column("size", "Size", _size)
# used_bytes: what the instance takes in object storage (every generation,
# snapshots, WAL), sampled every 30 s; not the disk's allocated blocks.
USED = Column("used", "Stored", _used)
# allocated_bytes: the disk's blocks that hold data (not holes), kept exact by the daemon.
ALLOCATED = Column("allocated", "Allocated", _allocated)
CLIENTS = Column("clients", "Clients", _clients)
FLUSH = Column("flush", "Flush p99", _flush_p99)

# Layouts by terminal width: pairs of read/write values share a column when
# space is short, and the storage URL gets a column once there is room for a
# useful part of it, cut with an ellipsis (it is whole in the details panel).
COLUMNS_NARROW: tuple[Column, ...] = (
    NAME,
    STATE,
    SIZE,
    USED,
    Column("clients", "Cl", _clients),
    Column("iops", "IOPS r/w", _pair(_r_iops, _w_iops)),
    Column("mibs", "MiB/s r/w", _pair(_r_mib, _w_mib)),
    FLUSH,
)
COLUMNS_WIDE: tuple[Column, ...] = (
    NAME,
    STATE,
    SIZE,
    USED,
    CLIENTS,
    Column("iops", "IOPS r/w", _pair(_r_iops, _w_iops)),
    Column("mibs", "MiB/s r/w", _pair(_r_mib, _w_mib)),
    FLUSH,
    Column("dirty", "Dirty", _dirty),
    Column("snaps", "Snaps", _snaps),
    Column("trend", "Throughput", _trend(12), "left"),
)
COLUMNS_FULL: tuple[Column, ...] = (
    NAME,
    STATE,
    SIZE,
    ALLOCATED,
    USED,
    Column("clients", "Cl", _clients),  # narrow, to leave room for Allocated
    Column("riops", "R IOPS", _r_iops),
    Column("wiops", "W IOPS", _w_iops),
    Column("rmib", "R MiB/s", _r_mib),
    Column("wmib", "W MiB/s", _w_mib),
    FLUSH,
    Column("dirty", "Dirty", _dirty),
    Column("snaps", "Snaps", _snaps),
    Column("trend", "Throughput", _trend(14), "left"),
    Column("url", "Storage", _url(34), "left"),
)
COLUMNS_WIDE_URL: tuple[Column, ...] = (*COLUMNS_WIDE, Column("url", "Storage", _url(20), "left"))


def columns_for_width(width: int) -> tuple[Column, ...]:
    if width >= 170:
        return COLUMNS_FULL
    if width >= 140:
        return COLUMNS_WIDE_URL
    if width >= 118:
        return COLUMNS_WIDE
    return COLUMNS_NARROW


@dataclass(frozen=True, slots=True)
class SortKey:
    """One way to order the overview: `s` cycles through them, `S` reverses.

    Numbers sort biggest first (what needs attention), names A to Z. An
    instance without the value (down, or an older daemon) goes last either way.
    """

    label: str
    value: Callable[[Instance], float | str | None]
    columns: frozenset[str]  # the column keys whose header shows the arrow
    descending: bool = True


def _live(get: Callable[[Instance], float | None]) -> Callable[[Instance], float | None]:
    def value(inst: Instance) -> float | None:
        return get(inst) if _st(inst) else None

    return value


def _status_value(get: Callable[[Status], float | None]) -> Callable[[Instance], float | None]:
    return _live(lambda i: get(i.status) if i.status is not None else None)


STATE_ORDER = {State.DOWN: 0, State.UNRESPONSIVE: 1, State.CONNECTING: 2, State.UP: 3}
SORT_KEYS: tuple[SortKey, ...] = (
    SortKey("name", lambda i: i.name.lower(), frozenset({"name"}), descending=False),
    # the troubled ones first
    SortKey("state", lambda i: STATE_ORDER[i.state], frozenset({"state"}), descending=False),
    SortKey("size", lambda i: i.status.size_bytes if i.status else None, frozenset({"size"})),
    SortKey(
        "allocated",
        lambda i: i.status.allocated_bytes if i.status else None,
        frozenset({"allocated"}),
    ),
    SortKey("stored", lambda i: i.status.used_bytes if i.status else None, frozenset({"used"})),
    SortKey("clients", _status_value(lambda s: s.connections), frozenset({"clients"})),
    SortKey(
        "IOPS",
        _live(lambda i: i.rates.total_iops if i.rates else None),
        frozenset({"iops", "riops", "wiops"}),
    ),
    SortKey(
        "MiB/s",
        _live(lambda i: i.rates.total_bps if i.rates else None),
        frozenset({"mibs", "rmib", "wmib", "trend"}),
    ),
    SortKey("flush p99", _status_value(lambda s: s.flush_latency.p99), frozenset({"flush"})),
    SortKey("dirty", _status_value(lambda s: s.dirty_bytes), frozenset({"dirty"})),
    SortKey(
        "snapshots", lambda i: i.status.snapshot_count if i.status else None, frozenset({"snaps"})
    ),
)


def sort_instances(
    instances: Sequence[Instance], key: SortKey, reverse: bool = False
) -> list[Instance]:
    """`instances` in `key`'s order (`reverse` flips it); no value last, ties by name."""
    by_name = sorted(instances, key=lambda i: (i.name, i.key))
    known: list[tuple[float | str, Instance]] = []
    unknown: list[Instance] = []
    for inst in by_name:
        value = key.value(inst)
        if value is None:
            unknown.append(inst)
        else:
            known.append((value, inst))
    # A stable sort, reversed or not, keeps equal values in name order.
    known.sort(key=lambda pair: pair[0], reverse=key.descending != reverse)
    return [inst for _, inst in known] + unknown


def sort_arrow(key: SortKey, reverse: bool) -> str:
    """▼ when the column runs from its biggest value down, ▲ from its smallest up."""
    return "▼" if key.descending != reverse else "▲"


def row(inst: Instance, columns: Sequence[Column]) -> list[Text]:
    cells: list[Text] = []
    for col in columns:
        value = col.cell(inst)
        text = value if isinstance(value, Text) else Text(value)
        text.justify = "left" if col.justify == "left" else "right"
        cells.append(text)
    return cells


def summary_lines(inst: Instance) -> list[Text]:
    """The facts block at the top of the instance screen and under the overview.

    Short lines, one topic each, so that it reads at 80 columns without wrapping.
    """
    st = inst.status
    lines = [
        Text.assemble((inst.name, "bold"), "  ", state_text(inst), "  ", (str(inst.socket), "dim"))
    ]
    if inst.last_error and inst.state is not State.UP:
        lines.append(Text(inst.last_error, style="yellow"))
    if st is None:
        lines.append(Text("no status received yet", style="dim"))
        return lines
    if st.storage_state != "ok":
        lines.append(Text(f"storage failing: {st.storage_state}", style="bold red"))
    if st.ephemeral:
        lines.append(
            Text(
                "memory storage: everything on this disk is lost when the daemon exits",
                style="bold yellow",
            )
        )
    if st.replica is not None:
        lines.append(Text(st.replica, style="cyan"))
    if st.snapshot_schedule is not None:
        lines.append(Text(f"scheduled snapshots {st.snapshot_schedule}", style="dim"))
    lines.append(
        _facts(
            ("size", fmt_bytes(st.size_bytes)),
            ("allocated", _allocated_fact(st)),
            ("dirty", fmt_bytes(st.dirty_bytes)),
            ("cached", fmt_bytes(st.cached_bytes)),
        )
    )
    lines.append(
        _facts(
            ("clients", f"{st.connections} ({st.connections_total} since start)"),
            *((("from", ", ".join(st.client_peers)),) if st.client_peers else ()),
            ("in flight", str(st.inflight)),
            ("up", fmt_duration(st.uptime_s)),
            ("pid", DASH if st.pid is None else str(st.pid)),
            ("snaps", str(st.snapshot_count)),
        )
    )
    tls: tuple[tuple[str, str], ...] = ()
    if st.nbd_tls is not None:
        shown = {"require": "required", "allow": "allowed"}.get(st.nbd_tls, st.nbd_tls)
        tls = (("tls", shown + (" +client certs" if st.nbd_tls_client_certificates else "")),)
    stored: tuple[tuple[str, str], ...] = ()
    if st.used_bytes is not None:  # object storage taken, all generations; absent for memory
        stored = (("stored", f"{fmt_bytes(st.used_bytes)} (sampled every 30 s)"),)
    generation = "" if st.generation is None else f" (gen {st.generation})"
    lines.append(_facts(("storage", (st.storage_url or DASH) + generation), *stored))
    lines.append(
        _facts(
            ("nbd", st.nbd_address or DASH),
            *tls,
            ("version", st.version or DASH),
        )
    )
    return lines


def _allocated_fact(st: Status) -> str:
    """The allocated bytes, or how far the daemon's count of them has come."""
    progress = st.allocation_scan_progress
    if st.allocated_bytes is None and progress is not None:
        return f"counting ({progress:.0%})"
    return fmt_bytes(st.allocated_bytes)


def _facts(*pairs: tuple[str, str]) -> Text:
    text = Text()
    for i, (label, value) in enumerate(pairs):
        text.append(("  " if i else "") + label + " ", style="dim")
        text.append(value)
    return text


def event_text(event: Event) -> Text:
    style = EVENT_STYLE[event.level]
    return Text.assemble((fmt_clock(event.wall), "dim"), " ", (event.text, style))


LOG_LEVEL_STYLE = {"debug": "dim", "warning": "bold yellow", "error": "bold red"}


def log_line_text(line: LogLine) -> Text:
    """A daemon log record: time, level, logger, message (wrapped by the panel)."""
    style = LOG_LEVEL_STYLE.get(line.level, "bold red" if line.level == "critical" else "")
    return Text.assemble(
        (fmt_clock(line.wall), "dim"),
        " ",
        (line.level, style or "green"),
        " ",
        (f"{line.logger}: " if line.logger else "", "dim"),
        (line.message, "dim" if line.level == "debug" else ""),
    )


def snapshot_row(snap: Snapshot) -> list[Text]:
    return [
        Text(ellipsize(snap.name, SNAPSHOT_NAME_CELL), style="bold"),
        Text(fmt_time(snap.created_at)),
        Text(DASH if snap.generation is None else str(snap.generation), justify="right"),
        Text(fmt_bytes(snap.size_bytes), justify="right"),
    ]


def snapshot_name_problem(name: str, existing: Sequence[str] = ()) -> str | None:
    """Why `name` cannot be used for a new snapshot, or None if it can.

    The daemon's own rule (`portalbd.control.protocol`), checked before
    sending so typos are caught while typing; only "already taken" is the
    TUI's, from the list it last read. The daemon checks again and its
    message is shown if it disagrees.
    """
    problem = daemon_name_problem(name)
    if problem is None and name in existing:
        return f"a snapshot named {name!r} already exists"
    return problem


def matches_filter(inst: Instance, text: str) -> bool:
    """The overview's `/` filter: a case-insensitive part of the name, URL, socket or state."""
    needle = text.strip().lower()
    if not needle:
        return True
    url = inst.status.storage_url if inst.status else ""
    haystack = (inst.name, url, str(inst.socket), inst.state.value)
    return any(needle in value.lower() for value in haystack)


def help_rows(bindings: Sequence[tuple[str, str, str, bool]]) -> list[tuple[str, str]]:
    """(keys, what) lines for the help screen from (key shown, action, description, in footer).

    The footer's keys come first (what the screen is for), then the rest
    (moving around). Keys bound to the same action share a line ("↓ j");
    bindings without a description are internal and left out. The longest
    description wins, as the most explicit one ("Cursor down" over "Down").
    """
    keys: dict[str, list[str]] = {}
    what: dict[str, str] = {}
    main: set[str] = set()
    for key, action, description, shown in bindings:
        if not description:
            continue
        if key not in keys.setdefault(action, []):
            keys[action].append(key)
        if len(description) > len(what.get(action, "")):
            what[action] = description
        if shown:
            main.add(action)
    order = sorted(keys, key=lambda action: action not in main)  # stable: main keys first
    return [(" ".join(keys[action]), what[action]) for action in order]


def is_client_refusal(message: str) -> bool:
    """Whether a restore error is the daemon protecting attached clients (so force helps)."""
    return "client" in message.lower()
