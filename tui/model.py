"""What the TUI knows about each instance, kept free of Textual and of I/O.

The poller feeds `Instance` with status samples and failures; screens only read
it. Rates are derived from the difference of two successive cumulative
counters, so they are exact over the sampling interval however often the
daemon is polled, and a daemon restart (counters going backwards) yields no
rate rather than a huge negative one.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portalbd.snapshot_schedule import schedule_text

HISTORY_POINTS = 300  # five minutes at the default one-second refresh
EVENT_LINES = 200
DAEMON_LOG_LINES = 500  # as many as the daemon keeps (portalbd.log.RECENT_LINES)


def _num(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(d: dict[str, Any], key: str, default: int = 0) -> int:
    value = _num(d, key)
    return default if value is None else int(value)


def _dict(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    p50: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Latency:
        if _num(d, "count") == 0:
            return cls()  # no samples: a 0.0 percentile would read as "instant"
        return cls(p50=_num(d, "p50"), p99=_num(d, "p99"), max=_num(d, "max"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """One `Status` reply. Missing fields get neutral defaults: the protocol only adds."""

    instance: str = ""
    version: str = ""
    size_bytes: int = 0
    used_bytes: int | None = None
    # blocks holding data (not holes); None before the daemon's opening scan, or from an older one
    allocated_bytes: int | None = None
    allocation_scan_progress: float | None = None  # 0..1 while the daemon counts them
    block_size: int | None = None
    snapshot_count: int = 0
    storage_url: str = ""
    # memory storage: the disk dies with the daemon
    ephemeral: bool = False
    nbd_address: str | None = None
    control_socket: str | None = None
    uptime_s: float | None = None
    generation: int | None = None
    pid: int | None = None
    connections: int = 0
    connections_total: int = 0
    inflight: int = 0
    errors: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    trims: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    dirty_bytes: int | None = None
    cached_bytes: int | None = None
    read_latency: Latency = field(default_factory=Latency)
    write_latency: Latency = field(default_factory=Latency)
    flush_latency: Latency = field(default_factory=Latency)
    # Peer addresses of the connected clients, when the daemon lists them
    # (`"clients": [{"peer": "127.0.0.1:5000", ...}]`); otherwise only counts.
    client_peers: tuple[str, ...] = ()
    # "ok", or why storage last failed ("storage full: ...", read-only, gone)
    storage_state: str = "ok"
    # a --read-only daemon: what it serves ("following the writer ...", "snapshot NAME")
    replica: str | None = None
    # "require", "allow" or "off"; None from a daemon that does not say
    nbd_tls: str | None = None
    nbd_tls_client_certificates: bool = False
    # [snapshots] every = ...: the policy and the next slot in one line; None when off
    snapshot_schedule: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Status:
        stats = _dict(d, "stats")
        commands = _dict(stats, "commands")
        latency = _dict(stats, "latency_us")
        flush = _dict(stats, "flush_latency_us") or _dict(latency, "flush")
        used = _num(stats, "used_bytes")
        if used is None:
            used = _num(d, "used_bytes")
        dirty = _num(stats, "dirty_bytes")
        allocated = _num(stats, "allocated_bytes")
        cached = _num(stats, "cached_bytes")
        uptime = _num(d, "uptime_s")
        generation = _num(d, "generation")
        pid = _num(d, "pid")
        block_size = _num(d, "block_size")
        return cls(
            instance=str(d.get("instance") or ""),
            version=str(d.get("version") or ""),
            size_bytes=_int(d, "size_bytes"),
            used_bytes=None if used is None else int(used),
            allocated_bytes=None if allocated is None else int(allocated),
            allocation_scan_progress=_num(stats, "allocation_scan_progress"),
            block_size=None if block_size is None else int(block_size),
            snapshot_count=_int(d, "snapshot_count"),
            storage_url=str(d.get("storage_url") or ""),
            ephemeral=d.get("ephemeral") is True,
            nbd_address=d.get("nbd_address") if isinstance(d.get("nbd_address"), str) else None,
            control_socket=(
                d.get("control_socket") if isinstance(d.get("control_socket"), str) else None
            ),
            uptime_s=uptime,
            generation=None if generation is None else int(generation),
            pid=None if pid is None else int(pid),
            connections=_int(stats, "connections"),
            connections_total=_int(stats, "connections_total"),
            inflight=_int(stats, "inflight"),
            errors=_int(stats, "errors"),
            reads=_int(commands, "read"),
            writes=_int(commands, "write"),
            flushes=_int(commands, "flush"),
            trims=_int(commands, "trim"),
            bytes_read=_int(stats, "bytes_read"),
            bytes_written=_int(stats, "bytes_written"),
            dirty_bytes=None if dirty is None else int(dirty),
            cached_bytes=None if cached is None else int(cached),
            read_latency=Latency.from_json(_dict(latency, "read")),
            write_latency=Latency.from_json(_dict(latency, "write")),
            flush_latency=Latency.from_json(flush),
            client_peers=_peers(d.get("clients", stats.get("clients"))),
            storage_state=str(stats.get("storage_state") or "ok"),
            replica=_replica(d.get("replica")),
            nbd_tls=d.get("nbd_tls") if isinstance(d.get("nbd_tls"), str) else None,
            nbd_tls_client_certificates=d.get("nbd_tls_client_certificates") is True,
            snapshot_schedule=(
                schedule_text(d["snapshot_schedule"])
                if isinstance(d.get("snapshot_schedule"), dict)
                else None
            ),
        )


def _replica(value: Any) -> str | None:
    """How a read replica describes itself in one line (None for a writer)."""
    if not isinstance(value, dict):
        return None
    if value.get("mode") == "snapshot":
        return f"read-only replica of snapshot {value.get('snapshot')}"
    lag = value.get("lag_bound_ms")
    return "read-only replica following the writer" + (
        f" (lag under {lag} ms)" if isinstance(lag, int) else ""
    )


def _peers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    peers = []
    for client in value:
        if isinstance(client, dict) and client.get("peer"):
            peers.append(str(client["peer"]))
        elif isinstance(client, str):
            peers.append(client)
    return tuple(peers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    name: str
    id: str = ""
    created_at: float | None = None
    generation: int | None = None
    size_bytes: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Snapshot:
        created = _num(d, "created_at")
        generation = _num(d, "generation")
        size = _num(d, "size_bytes")
        return cls(
            name=str(d.get("name", "")),
            id=str(d.get("id", "")),
            created_at=created,
            generation=None if generation is None else int(generation),
            size_bytes=None if size is None else int(size),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Rates:
    """Per-second activity over one sampling interval."""

    read_iops: float
    write_iops: float
    read_bps: float
    write_bps: float
    flush_ps: float

    @property
    def total_bps(self) -> float:
        return self.read_bps + self.write_bps

    @property
    def total_iops(self) -> float:
        return self.read_iops + self.write_iops


def rates_between(t0: float, a: Status, t1: float, b: Status) -> Rates | None:
    """Rates from two samples taken at monotonic times t0 < t1.

    None when the interval is empty or any counter went backwards, which means
    the daemon restarted between the samples (or is a different process).
    """
    dt = t1 - t0
    if dt <= 0:
        return None
    deltas = (
        b.reads - a.reads,
        b.writes - a.writes,
        b.bytes_read - a.bytes_read,
        b.bytes_written - a.bytes_written,
        b.flushes - a.flushes,
    )
    if any(x < 0 for x in deltas) or (a.pid is not None and b.pid is not None and a.pid != b.pid):
        return None
    reads, writes, bread, bwritten, flushes = deltas
    return Rates(
        read_iops=reads / dt,
        write_iops=writes / dt,
        read_bps=bread / dt,
        write_bps=bwritten / dt,
        flush_ps=flushes / dt,
    )


# A daemon's start (sample time minus its uptime) moves by the time a reply
# takes to arrive (and a busy TUI takes to look at it), under the 3 s status
# deadline; a restart moves it by the old daemon's lifetime, and a new pid
# says so anyway outside a container.
START_JITTER_S = 5.0


def restart_between(t0: float, a: Status, t1: float, b: Status) -> str | None:
    """Why the sample at t1 comes from another daemon process than the one at t0, or None.

    A new pid, a later start (monotonic sample time minus uptime: the same
    pid can come back in a container), or a cumulative counter going
    backwards (an older daemon that sends neither) each mean a restart.
    """
    if a.pid is not None and b.pid is not None and a.pid != b.pid:
        return f"pid {a.pid} → {b.pid}"
    up_a, up_b = a.uptime_s, b.uptime_s
    if up_a is not None and up_b is not None and (t1 - up_b) - (t0 - up_a) > START_JITTER_S:
        return f"up {up_b:.0f}s"
    counters = ("reads", "writes", "flushes", "bytes_read", "bytes_written", "errors")
    if any(getattr(b, name) < getattr(a, name) for name in counters):
        return "counters went back"
    return None


class State(enum.Enum):
    """How the instance last answered (or failed to)."""

    CONNECTING = "connecting"
    UP = "up"
    UNRESPONSIVE = "unresponsive"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Event:
    wall: float
    level: str  # "info" | "warning" | "error"
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LogLine:
    """One record of the daemon's own log (the `Log` request)."""

    seq: int
    wall: float
    level: str
    logger: str = ""
    message: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LogLine | None:
        seq, wall = _num(d, "seq"), _num(d, "time")
        if seq is None or wall is None:
            return None
        return cls(
            seq=int(seq),
            wall=wall,
            level=str(d.get("level") or "info"),
            logger=str(d.get("logger") or ""),
            message=str(d.get("message") or ""),
        )


@dataclass(slots=True)
class History:
    """Fixed-length series for the charts; one point per successful sample."""

    size: int = HISTORY_POINTS
    read_iops: deque[float] = field(init=False)
    write_iops: deque[float] = field(init=False)
    read_bps: deque[float] = field(init=False)
    write_bps: deque[float] = field(init=False)
    total_bps: deque[float] = field(init=False)
    read_p99: deque[float] = field(init=False)
    write_p99: deque[float] = field(init=False)
    flush_p99: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        for name in (
            "read_iops",
            "write_iops",
            "read_bps",
            "write_bps",
            "total_bps",
            "read_p99",
            "write_p99",
            "flush_p99",
        ):
            setattr(self, name, deque(maxlen=self.size))

    def clear(self) -> None:
        """Start again: a restarted daemon's charts must not join the old one's."""
        self.__post_init__()

    def add(self, rates: Rates, status: Status) -> None:
        self.read_iops.append(rates.read_iops)
        self.write_iops.append(rates.write_iops)
        self.read_bps.append(rates.read_bps)
        self.write_bps.append(rates.write_bps)
        self.total_bps.append(rates.total_bps)
        self.read_p99.append(status.read_latency.p99 or 0.0)
        self.write_p99.append(status.write_latency.p99 or 0.0)
        self.flush_p99.append(status.flush_latency.p99 or 0.0)


def name_from_socket(path: Path) -> str:
    """The instance name implied by the documented layout `<root>/<instance>/control.sock`."""
    if path.name == "control.sock" and path.parent.name:
        return path.parent.name
    return path.stem or str(path)


@dataclass(slots=True)
class Instance:
    """Everything shown about one daemon, keyed by its control socket."""

    socket: Path
    state: State = State.CONNECTING
    status: Status | None = None
    rates: Rates | None = None
    history: History = field(default_factory=History)
    snapshots: list[Snapshot] | None = None
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENT_LINES))
    last_error: str | None = None
    explicit: bool = False
    event_total: int = 0  # events ever logged, so viewers can append only the new ones
    # The daemon's own recent log, fetched while someone looks at it.
    daemon_log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=DAEMON_LOG_LINES))
    daemon_log_total: int = 0
    # Why there is no daemon log to show (an older daemon), or None.
    daemon_log_note: str | None = None
    _sample_t: float | None = None
    _last_t: float | None = None  # of the last good sample, kept across outages

    @property
    def name(self) -> str:
        if self.status is not None and self.status.instance:
            return self.status.instance
        return name_from_socket(self.socket)

    @property
    def key(self) -> str:
        return str(self.socket)

    def log(self, wall: float, level: str, text: str) -> None:
        self.events.append(Event(wall, level, text))
        self.event_total += 1

    @property
    def daemon_log_seq(self) -> int:
        """The newest record held: the next `Log` asks only for those after it."""
        return self.daemon_log[-1].seq if self.daemon_log else -1

    def add_daemon_log(self, lines: list[LogLine]) -> None:
        """Records from a `Log` reply; those already held are skipped."""
        for line in lines:
            if line.seq > self.daemon_log_seq:
                self.daemon_log.append(line)
                self.daemon_log_total += 1
        self.daemon_log_note = None

    def _forget_daemon_log(self) -> None:
        """A new daemon numbers its records from 0 again (and may be a newer version)."""
        self.daemon_log = deque(maxlen=DAEMON_LOG_LINES)
        self.daemon_log_total = 0
        self.daemon_log_note = None

    def record_status(self, t: float, wall: float, status: Status) -> None:
        """A successful poll at monotonic time t (wall: for the event log).

        A restart, seen directly or across an outage, is logged as one and
        starts the charts again: no rate spans two processes.
        """
        previous, previous_t = self.status, self._sample_t
        restart = None
        if previous is not None and self._last_t is not None:
            restart = restart_between(self._last_t, previous, t, status)
        if restart is not None:
            self.log(wall, "warning", f"daemon restarted ({restart})")
            self.history.clear()
            self._forget_daemon_log()
            previous_t = None
        elif self.state is not State.UP:
            again = self.state in (State.DOWN, State.UNRESPONSIVE)
            self.log(wall, "info", "answering again" if again else "connected")
        if restart is None and previous is not None:
            if previous.generation != status.generation and status.generation is not None:
                self.log(wall, "info", f"disk generation {status.generation} is live")
            if status.errors > previous.errors:
                n = status.errors - previous.errors
                self.log(wall, "error", f"{n} NBD request{'s' if n != 1 else ''} failed")
        self.rates = None
        if previous is not None and previous_t is not None:
            self.rates = rates_between(previous_t, previous, t, status)
        if self.rates is not None:
            self.history.add(self.rates, status)
        self.status = status
        self._sample_t = self._last_t = t
        self.state = State.UP
        self.last_error = None

    def record_failure(self, wall: float, state: State, message: str) -> None:
        """A poll that failed: DOWN when nothing listens, UNRESPONSIVE when it timed out."""
        if state is not self.state or message != self.last_error:
            level = "error" if state is State.DOWN else "warning"
            self.log(wall, level, message)
        self.state = state
        self.last_error = message
        self.rates = None
        self._sample_t = None  # the next good sample starts a new rate interval

    def set_snapshots(self, snapshots: list[Snapshot]) -> None:
        self.snapshots = snapshots


class Fleet:
    """The instances on screen, in the order they were first seen."""

    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)

    def get(self, key: str) -> Instance | None:
        return self._instances.get(key)

    def add(self, socket: Path, *, explicit: bool = False) -> tuple[Instance, bool]:
        """The instance for `socket`, and whether it is new."""
        key = str(socket)
        found = self._instances.get(key)
        if found is not None:
            found.explicit = found.explicit or explicit
            return found, False
        inst = Instance(socket=socket, explicit=explicit)
        self._instances[key] = inst
        return inst, True

    def sorted(self) -> list[Instance]:
        return sorted(self._instances.values(), key=lambda i: (i.name, i.key))
