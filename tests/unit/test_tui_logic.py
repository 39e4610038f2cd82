"""The TUI's logic without an app: formatting, rates, state, discovery, validation."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd.control.async_client import AsyncControlClient
from portalbd.control.errors import ProtocolError, Timeout, Unreachable
from portalbd.control.protocol import BadRequest, check_snapshot_name
from tui.app import parse_args
from tui.config import pick_theme, terminal_is_light
from tui.demo import demo_fleet, instance
from tui.discovery import default_roots, scan
from tui.format import (
    bar_rows,
    ellipsize,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_latency_us,
    fmt_mib_s,
    resample,
    sparkline,
)
from tui.model import (
    Fleet,
    LogLine,
    Rates,
    Snapshot,
    State,
    Status,
    name_from_socket,
    rates_between,
    restart_between,
)
from tui.view import (
    COLUMNS_FULL,
    COLUMNS_NARROW,
    COLUMNS_WIDE,
    COLUMNS_WIDE_URL,
    columns_for_width,
    help_rows,
    is_client_refusal,
    row,
    snapshot_name_problem,
    snapshot_row,
    summary_lines,
)

# --- formatting -------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "—"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * 1024, "64.0 KiB"),
        (1024**3, "1.0 GiB"),
        (int(23.7 * 1024**3), "23.7 GiB"),
        (640 * 1024**2, "640.0 MiB"),
        (5 * 1024**6, "5.0 EiB"),  # the TUI and portalctl share one formatter
    ],
)
def test_fmt_bytes(n: int | None, text: str) -> None:
    assert fmt_bytes(n) == text


def test_fmt_rates_and_latency() -> None:
    mib = 1024 * 1024
    assert [fmt_mib_s(x) for x in (None, 0, 1000, 2.5 * mib, 130 * mib)] == [
        "—",
        "0",
        "<0.1",
        "2.5",
        "130",
    ]
    assert [fmt_count(x) for x in (None, 0, 3, 2.5, 999, 1500, 2_500_000)] == [
        "—",
        "0",
        "3",
        "2.5",
        "999",
        "1.5k",
        "2.5M",
    ]
    assert [fmt_latency_us(x) for x in (None, 80, 1500, 250_000, 2_500_000)] == [
        "—",
        "80µs",
        "1.5ms",
        "250ms",
        "2.50s",
    ]
    assert [fmt_duration(x) for x in (None, 5, 312, 7300, 3 * 86400 + 4 * 3600 + 5)] == [
        "—",
        "5.0s",
        "5m 12s",
        "2h 01m 40s",
        "3d 04h 00m",
    ]


def test_sparkline_and_bars_scale_to_their_peak() -> None:
    assert sparkline([], 4) == "    "
    assert sparkline([0, 0], 3) == " ▁▁"
    assert sparkline([1, 2, 4, 8], 4) == "▂▃▅█"
    assert sparkline(range(100), 5)[-1] == "█"  # only the last `width` values count
    assert bar_rows([0, 4, 8], 3, 1) == [" ▄█"]
    top, bottom = bar_rows([8, 16], 2, 2)
    assert (top, bottom) == (" █", "██")
    assert bar_rows([0.001, 100], 2, 1) == ["▁█"]  # light activity is never invisible
    assert bar_rows([5], 3, 1) == ["  █"]  # new history grows from the right


def test_resample_keeps_the_whole_history_in_the_width() -> None:
    assert resample([1, 2, 3], 5) == [1, 2, 3]
    assert resample([1, 3, 5, 7], 2) == [2, 6]
    assert resample([1, 9, 1, 1], 2, "max") == [9, 1]  # a latency spike survives
    assert len(resample(deque(range(300), maxlen=300), 29)) == 29
    assert resample([1.0], 0) == []


# --- model ------------------------------------------------------------------


def _status(**stats: object) -> Status:
    body: dict[str, object] = {"instance": "t", "size_bytes": 1 << 30, "pid": 7}
    body["stats"] = {"commands": {"read": stats.pop("reads", 0), "write": stats.pop("writes", 0)}}
    body["stats"].update(stats)  # type: ignore[attr-defined]
    return Status.from_json(body)


def test_status_parses_the_documented_example_and_tolerates_gaps() -> None:
    st = Status.from_json(
        {
            "size_bytes": 1073741824,
            "snapshot_count": 2,
            "instance": "default",
            "storage_url": "file:///var/lib/portalbd/default",
            "stats": {
                "connections": 1,
                "commands": {"read": 10, "write": 5, "flush": 1},
                "bytes_read": 40960,
                "latency_us": {"read": {"p50": 80, "p99": 300}},
                "flush_latency_us": {"p99": 4000},
                "dirty_bytes": 65536,
                "used_bytes": 1048576,
                "new_field_from_the_future": [1, 2],
            },
        }
    )
    assert (st.size_bytes, st.snapshot_count, st.connections, st.reads, st.writes) == (
        1 << 30,
        2,
        1,
        10,
        5,
    )
    assert st.read_latency.p99 == 300 and st.write_latency.p99 is None
    assert st.flush_latency.p99 == 4000
    assert st.used_bytes == 1 << 20 and st.dirty_bytes == 65536
    empty = Status.from_json({"size_bytes": "not a number", "stats": None})
    assert empty.size_bytes == 0 and empty.used_bytes is None and empty.uptime_s is None


def test_rates_are_counter_differences_over_time() -> None:
    a = _status(reads=100, writes=10, bytes_read=100 * 4096, bytes_written=0)
    b = _status(reads=300, writes=30, bytes_read=300 * 4096, bytes_written=20 * 65536)
    r = rates_between(10.0, a, 12.0, b)
    assert r == Rates(
        read_iops=100.0, write_iops=10.0, read_bps=100 * 4096.0, write_bps=10 * 65536.0, flush_ps=0
    )
    assert rates_between(12.0, a, 12.0, b) is None  # empty interval
    assert rates_between(10.0, b, 11.0, a) is None  # counters went back: restart


def test_instance_states_events_and_history() -> None:
    fleet = Fleet()
    inst, new = fleet.add(Path("/run/portalbd/db/control.sock"))
    assert new and inst.name == "db"
    assert [e.text for e in inst.events] == [] and str(inst.state) == str(State.CONNECTING)
    assert fleet.add(Path("/run/portalbd/db/control.sock"), explicit=True) == (inst, False)
    assert inst.explicit

    inst.record_status(0.0, 100.0, _status(reads=0))
    assert inst.state is State.UP and inst.rates is None  # one sample gives no rate yet
    inst.record_status(1.0, 101.0, _status(reads=50, errors=0))
    assert inst.rates is not None and inst.rates.read_iops == 50
    assert list(inst.history.read_iops) == [50.0]

    inst.record_failure(102.0, State.UNRESPONSIVE, "unresponsive: no answer within 3s")
    inst.record_failure(103.0, State.UNRESPONSIVE, "unresponsive: no answer within 3s")
    assert inst.state is State.UNRESPONSIVE and inst.rates is None
    inst.record_failure(104.0, State.DOWN, "socket not found (daemon not running)")
    inst.record_status(5.0, 105.0, _status(reads=60, errors=2))
    assert inst.state is State.UP and inst.last_error is None
    assert inst.rates is None  # no rate across an outage
    texts = [e.text for e in inst.events]
    assert texts == [
        "connected",
        "unresponsive: no answer within 3s",  # logged once, not on every failed poll
        "socket not found (daemon not running)",
        "answering again",
        "2 NBD requests failed",
    ]
    assert inst.event_total == 5
    restarted = Status.from_json({"instance": "db", "pid": 8, "stats": {"errors": 0}})
    inst.record_status(6.0, 106.0, restarted)
    assert inst.events[-1].text == "daemon restarted (pid 7 → 8)"
    inst.record_status(7.0, 107.0, Status.from_json({"pid": 8, "stats": {"errors": 3}}))
    assert (inst.events[-1].level, inst.events[-1].text) == ("error", "3 NBD requests failed")


def test_a_restart_is_logged_as_such_and_starts_the_charts_again() -> None:
    def up(uptime: float, reads: int, pid: int = 1) -> Status:
        return Status.from_json(
            {
                "pid": pid,
                "uptime_s": uptime,
                "stats": {"commands": {"read": reads}, "bytes_read": reads * 4096},
            }
        )

    inst, _ = Fleet().add(Path("/run/portalbd/c/control.sock"))
    for i in range(5):  # started at t=90, 100 reads a second
        inst.record_status(100.0 + i, 0.0, up(10.0 + i, 100 * i))
    assert len(inst.history.read_iops) == 4 and inst.rates and inst.rates.read_iops == 100
    line = LogLine.from_json({"seq": 7, "time": 1.5, "level": "info", "message": "m"})
    assert line is not None and LogLine.from_json({"message": "no seq"}) is None
    inst.add_daemon_log([line])
    assert inst.daemon_log_seq == 7
    # Same pid (pid 1 in a container), started again at t=104.5, already busier
    # than the old one was: no down in between, and the counters did not go back.
    inst.record_status(105.0, 0.0, up(0.5, 900))
    assert inst.events[-1].text == "daemon restarted (up 0s)"
    assert inst.events[-1].level == "warning"
    assert inst.rates is None and len(inst.history.read_iops) == 0  # no spike, charts reset
    assert inst.daemon_log_seq == -1 and not inst.daemon_log  # its log numbers from 0 again
    inst.record_status(106.0, 0.0, up(1.5, 1000))
    assert list(inst.history.read_iops) == [100.0]

    # Across an outage: one "restarted" (not "answering again"), no negative rate.
    inst.record_failure(107.0, State.DOWN, "connection refused")
    inst.record_status(120.0, 0.0, up(2.0, 50, pid=2))
    assert [e.text for e in inst.events][-2:] == [
        "connection refused",
        "daemon restarted (pid 1 → 2)",
    ]
    inst.record_status(121.0, 0.0, up(3.0, 60, pid=2))
    assert list(inst.history.read_iops) == [10.0]
    # Down and back without a restart: answering again, the history kept.
    inst.record_failure(122.0, State.DOWN, "connection refused")
    inst.record_status(130.0, 0.0, up(12.0, 70, pid=2))
    assert inst.events[-1].text == "answering again" and len(inst.history.read_iops) == 1
    # An older daemon without pid or uptime: counters going back mean a restart.
    assert restart_between(0, _status(reads=5), 1, _status(reads=4)) == "counters went back"
    assert restart_between(0, _status(reads=5), 1, _status(reads=5)) is None


def test_name_from_socket() -> None:
    assert name_from_socket(Path("/run/portalbd/db/control.sock")) == "db"
    assert name_from_socket(Path("/tmp/x/my.sock")) == "my"


# --- view -------------------------------------------------------------------


def test_columns_fit_the_terminal_and_keep_the_required_fields() -> None:
    assert columns_for_width(80) is COLUMNS_NARROW
    assert columns_for_width(120) is COLUMNS_WIDE
    assert columns_for_width(200) is COLUMNS_FULL
    assert {c.key for c in COLUMNS_FULL} >= {
        "name",
        "state",
        "size",
        "used",
        "clients",
        "riops",
        "wiops",
        "rmib",
        "wmib",
        "flush",
        "dirty",
        "snaps",
        "trend",
        "url",
    }
    fleet = demo_fleet()
    db = instance(fleet, "db")
    cells = [c.plain for c in row(db, COLUMNS_NARROW)]
    assert cells[:5] == ["db", "● up", "64.0 GiB", "23.7 GiB", "2"]
    backup = instance(fleet, "backup")
    assert [c.plain for c in row(backup, COLUMNS_NARROW)][1:4] == ["✕ down", "—", "—"]
    # Every narrow row fits 80 columns with the table's padding and border.
    rows = [row(each, COLUMNS_NARROW) for each in fleet]
    widths = [
        max(len(col.label), *(len(r[i].plain) for r in rows))
        for i, col in enumerate(COLUMNS_NARROW)
    ]
    assert sum(widths) + 2 * len(widths) + 2 <= 80
    assert all(len(line.plain) <= 76 for line in summary_lines(db))  # 80 minus padding


def test_the_storage_url_gets_a_column_once_a_useful_part_fits() -> None:
    assert columns_for_width(139) is COLUMNS_WIDE
    assert columns_for_width(140) is COLUMNS_WIDE_URL
    assert COLUMNS_WIDE_URL[-1].label == "Storage"
    scratch = instance(demo_fleet(), "scratch")
    assert row(scratch, COLUMNS_WIDE_URL)[-1].plain == "file:///var/lib/por…"
    assert row(scratch, COLUMNS_FULL)[-1].plain == "file:///var/lib/portalbd/scratch"


def test_used_is_labelled_as_object_storage_sampled_every_30_s() -> None:
    assert COLUMNS_NARROW[3].label == "Stored"
    shown = [line.plain for line in summary_lines(instance(demo_fleet(), "db"))]
    assert "storage s3://disks/prod/db (gen 3)  stored 23.7 GiB (sampled every 30 s)" in shown
    # The disk's blocks holding data, beside what object storage holds.
    assert "size 64.0 GiB  allocated 19.8 GiB  dirty 3.1 MiB  cached 48.0 MiB" in shown
    assert [c.label for c in COLUMNS_FULL[2:5]] == ["Size", "Allocated", "Stored"]
    assert row(instance(demo_fleet(), "db"), COLUMNS_FULL)[3].plain == "19.8 GiB"
    older = Status.from_json({"stats": {"used_bytes": 5}})  # a daemon without the key
    assert older.allocated_bytes is None
    counting, _ = Fleet().add(Path("/run/portalbd/big/control.sock"))
    counting.record_status(
        0.0, 0.0, Status.from_json({"stats": {"allocation_scan_progress": 0.42}})
    )
    assert "allocated counting (42%)" in summary_lines(counting)[1].plain
    memory, _ = Fleet().add(Path("/run/portalbd/m/control.sock"))
    memory.record_status(0.0, 0.0, Status.from_json({"storage_url": "memory://"}))
    assert "storage memory://" in [line.plain for line in summary_lines(memory)]


def test_long_snapshot_names_are_cut_with_an_ellipsis() -> None:
    assert ellipsize("short", 8) == "short"
    assert ellipsize("exactly8", 8) == "exactly8"
    assert ellipsize("nine-char", 8) == "nine-ch…"
    assert ellipsize("x", 0) == ""
    snap = Snapshot(name="n" * 128, id="1", created_at=0.0, generation=1, size_bytes=0)
    name = snapshot_row(snap)[0].plain
    assert len(name) == 40 and name == "n" * 39 + "…"
    long, _ = Fleet().add(Path(f"/run/portalbd/{'i' * 60}/control.sock"))
    assert row(long, COLUMNS_NARROW)[0].plain == "i" * 23 + "…"
    assert summary_lines(long)[0].plain.startswith("i" * 60)  # whole in the details


def test_help_lists_footer_keys_first_and_joins_keys_of_one_action() -> None:
    rows = help_rows(
        [
            ("↓", "cursor_down", "Cursor down", False),
            ("j", "cursor_down", "Down", False),
            ("c", "create_snapshot", "New snapshot", True),
            ("x", "internal", "", False),
        ]
    )
    assert rows == [("c", "New snapshot"), ("↓ j", "Cursor down")]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("nightly-1", None),
        ("v1.2_rc", None),
        # the daemon's rule (control/protocol.py), not a stricter copy
        ("_nightly", None),
        ("x" * 128, None),
        ("", "a name is required"),
        ("-x", "must start with a letter or digit (or '_')"),
        ("a b", "only letters, digits, '.', '_' and '-'"),
        ("a/b", "only letters, digits, '.', '_' and '-'"),
        ("x" * 129, "at most 128 characters"),
        ("taken", "a snapshot named 'taken' already exists"),
    ],
)
def test_snapshot_name_validation(name: str, problem: str | None) -> None:
    assert snapshot_name_problem(name, ["taken"]) == problem


@pytest.mark.parametrize(
    "name", ["ok", "_x", "a\n", ".x", "-x", "é", "a" * 128, "a" * 129, "", "a b", "x/../y"]
)
def test_the_prompt_refuses_exactly_what_the_daemon_refuses(name: str) -> None:
    """One rule (portalbd.control.protocol): the prompt cannot accept a name the daemon refuses."""
    try:
        check_snapshot_name(name)
    except BadRequest as exc:
        refused: str | None = str(exc)
    else:
        refused = None
    assert (snapshot_name_problem(name) is None) == (refused is None), (name, refused)


def test_client_refusal_is_recognised() -> None:
    assert is_client_refusal("refusing to restore: 2 clients connected (use force)")
    assert not is_client_refusal("no snapshot named 'x'")


# --- config and arguments ---------------------------------------------------


def test_theme_follows_the_terminal_background() -> None:
    assert terminal_is_light({}) is None
    assert terminal_is_light({"COLORFGBG": "15;0"}) is False
    assert terminal_is_light({"COLORFGBG": "0;15"}) is True
    assert terminal_is_light({"COLORFGBG": "0;default;15"}) is True
    assert pick_theme("auto", {"COLORFGBG": "0;15"}) == "textual-light"
    assert pick_theme("auto", {}) == "textual-dark"
    assert pick_theme("ansi", {"COLORFGBG": "0;7"}) == "ansi-light"
    assert pick_theme("light", {}) == "textual-light"
    assert pick_theme("nord", {}) == "nord"


def test_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = parse_args(["--socket", "a.sock", "--socket", str(tmp_path / "b.sock"), "--refresh", "2"])
    assert s.sockets == (Path.cwd() / "a.sock", tmp_path / "b.sock")
    assert s.refresh_s == 2 and s.discover
    with pytest.raises(SystemExit):
        parse_args(["--no-discover"])
    assert "--no-discover needs at least one --socket" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--timeout", "0"])
    assert "must be positive" in capsys.readouterr().err


# --- discovery --------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _listen(path: Path, socks: list[socket.socket]) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    socks.append(s)
    return s


def test_discovery_follows_the_documented_layout(
    tmp_path: Path, listening: list[socket.socket]
) -> None:
    run, xdg = tmp_path / "run", tmp_path / "xdg"
    _listen(run / "a" / "control.sock", listening)
    _listen(xdg / "b" / "control.sock", listening)
    (run / "c").mkdir()
    (run / "c" / "control.sock").write_text("not a socket")
    _listen(run / "d" / "other.sock", listening)
    assert scan([run, xdg, tmp_path / "missing"]) == [
        run / "a" / "control.sock",
        xdg / "b" / "control.sock",
    ]
    assert default_roots({"XDG_RUNTIME_DIR": "/run/user/5"}, uid=5) == [
        Path("/run/portalbd"),
        Path("/run/user/5/portalbd"),
        Path("/tmp/portalbd-5"),
    ]
    assert default_roots({}, uid=5) == [Path("/run/portalbd"), Path("/tmp/portalbd-5")]


# --- control client failures (real sockets standing in for broken daemons) ---


def tui_client(path: Path, timeout: float) -> AsyncControlClient:
    """The client as the TUI makes it: short messages, shown next to their instance."""
    return AsyncControlClient(path, timeout, name_socket=False)


def test_control_client_tells_down_from_unresponsive(
    tmp_path: Path, listening: list[socket.socket]
) -> None:
    missing = tmp_path / "missing.sock"
    stale = tmp_path / "stale.sock"
    _listen(stale, listening).close()  # the file stays, nobody listens: refused
    hung = tmp_path / "hung.sock"
    _listen(hung, listening)  # accepts (backlog) but never answers

    async def run() -> None:
        with pytest.raises(Unreachable, match="socket not found"):
            await tui_client(missing, 1.0).status()
        with pytest.raises(Unreachable, match="connection refused"):
            await tui_client(stale, 1.0).status()
        client = tui_client(hung, 0.3)
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"no answer within 0.3s"):
            await client.status()
        assert time.monotonic() - started < 5  # bounded by the deadline, not hung
        await client.close()

    asyncio.run(run())


def test_control_client_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sock"

    async def run() -> None:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b'{"Unexpected": 1}\n')
            await reader.readline()
            writer.write(b"not json\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(reply, str(path))
        async with server:
            client = tui_client(path, 2.0)
            with pytest.raises(ProtocolError, match="expected Status"):
                await client.status()
            with pytest.raises(ProtocolError):
                await client.snapshot_list()
            await client.close()

    asyncio.run(run())
    assert not os.path.exists(path) or path.is_socket()


# --- the console script in a real terminal -----------------------------------


def test_console_script_runs_in_a_terminal_and_quits(tmp_path: Path) -> None:
    """`portalbd-tui` starts on a pseudo-terminal, draws, and exits on `q` with status 0."""
    import pty
    import select
    import subprocess
    import sys

    script = Path(sys.executable).parent / "portalbd-tui"
    primary, secondary = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="30")
    missing = tmp_path / "gone" / "control.sock"
    proc = subprocess.Popen(
        [str(script), "--no-discover", "--socket", str(missing), "--refresh", "0.2"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        close_fds=True,
    )
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"socket not found" not in seen and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.2)[0]:
                seen += os.read(primary, 65536)
        assert b"socket not found" in seen  # the instance is shown down, with the reason
        os.write(primary, b"q")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    assert b"Traceback" not in seen


def test_latency_without_samples_and_client_peers() -> None:
    st = Status.from_json(
        {
            "clients": [{"peer": "127.0.0.1:5000", "id": 1}, {"peer": "unix"}],
            "stats": {"flush_latency_us": {"count": 0, "p99": 0.0}, "connections": 2},
        }
    )
    assert st.flush_latency.p99 is None
    assert st.client_peers == ("127.0.0.1:5000", "unix")
    inst, _ = Fleet().add(Path("/run/portalbd/x/control.sock"))
    inst.record_status(0.0, 0.0, st)
    assert "from 127.0.0.1:5000, unix" in "\n".join(line.plain for line in summary_lines(inst))


@pytest.mark.parametrize(
    ("replica", "line"),
    [
        (
            {"mode": "follow", "snapshot": None, "lag_bound_ms": 700},
            "read-only replica following the writer (lag under 700 ms)",
        ),
        ({"mode": "snapshot", "snapshot": "s1"}, "read-only replica of snapshot s1"),
    ],
)
def test_a_read_replica_says_what_it_serves(replica: dict[str, object], line: str) -> None:
    inst, _ = Fleet().add(Path("/run/portalbd/r/control.sock"))
    inst.record_status(0.0, 0.0, Status.from_json({"read_only": True, "replica": replica}))
    assert line in [text.plain for text in summary_lines(inst)]
    assert Status.from_json({"replica": None}).replica is None


def test_a_failing_store_is_shown_with_its_reason() -> None:
    st = Status.from_json(
        {"stats": {"storage_state": "storage full: 0 bytes free on /var/lib/portalbd/db"}}
    )
    assert st.storage_state.startswith("storage full")
    inst, _ = Fleet().add(Path("/run/portalbd/db/control.sock"))
    inst.record_status(0.0, 0.0, st)
    shown = "\n".join(line.plain for line in summary_lines(inst))
    assert "storage failing: storage full: 0 bytes free" in shown
    healthy, _ = Fleet().add(Path("/run/portalbd/ok/control.sock"))
    healthy.record_status(0.0, 0.0, Status.from_json({"stats": {"storage_state": "ok"}}))
    assert "storage failing" not in "\n".join(line.plain for line in summary_lines(healthy))


def test_whether_tls_is_required_is_shown() -> None:
    def shown(status: dict[str, object]) -> str:
        inst, _ = Fleet().add(Path("/run/portalbd/db/control.sock"))
        inst.record_status(0.0, 0.0, Status.from_json(status))
        return "\n".join(line.plain for line in summary_lines(inst))

    assert "tls required +client certs" in shown(
        {"nbd_tls": "require", "nbd_tls_client_certificates": True}
    )
    assert "tls allowed" in shown({"nbd_tls": "allow"})
    assert "tls off" in shown({"nbd_tls": "off"})
    assert "tls" not in shown({})  # an older daemon says nothing: nothing is claimed


def test_a_memory_disk_says_it_dies_with_the_daemon() -> None:
    def shown(status: dict[str, object]) -> list[str]:
        inst, _ = Fleet().add(Path("/run/portalbd/m/control.sock"))
        inst.record_status(0.0, 0.0, Status.from_json(status))
        return [line.plain for line in summary_lines(inst)]

    warning = "memory storage: everything on this disk is lost when the daemon exits"
    assert warning in shown({"storage_url": "memory://", "ephemeral": True})
    assert warning not in shown({"storage_url": "file:///d", "ephemeral": False})
    assert warning not in shown({})  # an older daemon says nothing: nothing is claimed
