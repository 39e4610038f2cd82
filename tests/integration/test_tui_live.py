"""The TUI driven by Pilot against real portalbd daemons.

Two instances (one on file storage, one in memory) whose control sockets sit
in a temporary discovery root, so the app finds them the way it finds real
ones. Disk contents are checked with libnbd, snapshots with `portalctl` (not
through the TUI's own client).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from textual.pilot import Pilot
from textual.widgets import Input
from textual.widgets._toast import Toast

from portalbd.control.client import request_once
from tests.conftest import DaemonFactory
from tests.support import RunningDaemon
from tui.app import PortalbdApp
from tui.config import Settings
from tui.model import Instance, State
from tui.screens.dialogs import ConfirmScreen, SnapshotNameScreen
from tui.screens.instance import InstanceScreen
from tui.widgets.event_log import EventLog
from tui.widgets.tables import InstanceTable, SnapshotTable

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def expose(run: Path, daemon: RunningDaemon, name: str) -> None:
    """Make the daemon discoverable as `<run>/<name>/control.sock`, the documented layout.

    `start_daemon` keeps its socket in the test's workdir; a symlink puts it where
    discovery looks without changing how the daemon is started. When the daemon
    stops, its socket file goes and the link dangles, as a stopped instance's
    directory under /run would.
    """
    link = run / name / "control.sock"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(daemon.control_socket)


@pytest.fixture
def daemons(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> tuple[Path, RunningDaemon, RunningDaemon]:
    run = tmp_path / "run"
    mem = daemon_factory(instance="mem", storage_url="memory://", disk_size_gb=1)
    disk = daemon_factory(
        instance="disk", storage_url=f"file://{tmp_path / 'disk-data'}", disk_size_gb=2
    )
    expose(run, disk, "disk")  # "mem" is exposed once the TUI runs: it must appear by itself
    return run, mem, disk


async def wait_for(
    pilot: Pilot[None], what: str, check: Callable[[], bool], limit: float = 30
) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def find(app: PortalbdApp, name: str) -> Instance:
    found = [i for i in app.fleet if i.name == name]
    assert len(found) == 1, [i.name for i in app.fleet]
    return found[0]


def cell(app: PortalbdApp, inst: Instance, column: str) -> str:
    table = app.screen.query_one(InstanceTable)
    return str(table.get_cell(inst.key, column).plain)


def toasts(app: PortalbdApp) -> list[str]:
    return [t.render().plain for t in app.screen.query(Toast)]


def portalctl(daemon: RunningDaemon, *args: str) -> str:
    command = [str(Path(sys.executable).parent / "portalctl"), "--socket"]
    command += [str(daemon.control_socket), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def disk_pattern(byte: int) -> bytes:
    return bytes([byte]) * MiB


def test_tui_against_real_daemons(
    daemons: tuple[Path, RunningDaemon, RunningDaemon], daemon_factory: DaemonFactory
) -> None:
    run, mem, disk = daemons
    settings = Settings(roots=(run,), refresh_s=0.5, status_timeout_s=1.0, action_timeout_s=60)
    app = PortalbdApp(settings)

    # Data the snapshot will hold, written before the TUI starts.
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(disk_pattern(0xAA), 0)
    h.flush()

    async def scenario() -> None:
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            # Overview: both discovered, with their sizes; the second while running.
            await wait_for(pilot, "disk up", lambda: len(app.fleet) == 1)
            expose(run, mem, "mem")
            await wait_for(
                pilot,
                "both up",
                lambda: len(app.fleet) == 2 and all(i.state is State.UP for i in app.fleet),
            )
            await pilot.pause(0.3)
            m, d = find(app, "mem"), find(app, "disk")
            assert cell(app, m, "size") == "1.0 GiB" and cell(app, d, "size") == "2.0 GiB"
            assert "up" in cell(app, m, "state") and "up" in cell(app, d, "state")
            assert cell(app, d, "clients") == "1"  # our libnbd handle

            # Open "disk" (rows are sorted by name: disk, mem) and take a snapshot.
            table = app.screen.query_one(InstanceTable)
            table.move_cursor(row=table.get_row_index(d.key))
            await pilot.press("enter")
            await wait_for(pilot, "instance screen", lambda: isinstance(app.screen, InstanceScreen))
            await pilot.press("c")
            await wait_for(pilot, "name prompt", lambda: isinstance(app.screen, SnapshotNameScreen))
            name_input = app.screen.query_one(Input)
            assert name_input.value.startswith("snap-")  # a suggestion, replaced by typing
            await pilot.press("ctrl+a", *"bad name")  # checked while typing
            await pilot.pause()
            assert "only letters" in str(app.screen.query_one("#problem").render())
            await pilot.press("enter")  # refused by validation: the prompt stays
            assert isinstance(app.screen, SnapshotNameScreen)
            name_input.value = ""
            await pilot.press(*"before-change", "enter")
            await wait_for(
                pilot,
                "snapshot listed",
                lambda: [s.name for s in d.snapshots or ()] == ["before-change"],
            )
            # Checked with portalctl, the operator's other tool, not the TUI's client.
            listed = json.loads(portalctl(disk, "--json", "snapshot", "list"))
            assert [s["name"] for s in listed["SnapshotList"]] == ["before-change"]
            assert "before-change" in portalctl(disk, "snapshot", "list")
            await wait_for(
                pilot,
                "toast",
                lambda: any("snapshot before-change created" in t for t in toasts(app)),
            )
            # l: the daemon's own log (the Log request) in the panel, then the events again.
            await pilot.press("l")
            panel = app.screen.query_one(EventLog)
            await wait_for(
                pilot,
                "daemon log line",  # wrapped at the panel's width: joined to look for it
                lambda: "created name=before-change" in "".join(x.text for x in panel.lines),
            )
            assert panel.border_title == "Daemon log"
            await pilot.press("l")

            # Change the disk, then restore through the UI with the client still
            # attached: the daemon pauses its I/O for the swap and keeps it.
            h.pwrite(disk_pattern(0x55), 0)
            h.flush()
            await wait_for(pilot, "row", lambda: app.screen.query_one(SnapshotTable).row_count == 1)
            await pilot.press("r")
            await wait_for(pilot, "confirm", lambda: isinstance(app.screen, ConfirmScreen))
            assert "1 client is connected" in str(app.screen.query_one(".dialog--body").render())
            await pilot.press("y")
            await wait_for(
                pilot, "restored", lambda: any("restored to snapshot" in t for t in toasts(app))
            )
            assert h.pread(MiB, 0) == disk_pattern(0xAA)  # same connection, restored data

            # Delete confirmation, but the snapshot vanishes meanwhile (deleted by
            # someone else): the daemon's error is shown, nothing crashes.
            await pilot.press("d")
            await wait_for(pilot, "delete confirm", lambda: isinstance(app.screen, ConfirmScreen))
            assert (
                request_once(disk.control_socket, {"SnapshotDelete": {"name": "before-change"}})
                == "Ok"
            )
            await pilot.press("y")
            await wait_for(pilot, "error toast", lambda: any("not found" in t for t in toasts(app)))
            await pilot.press("escape")
            await wait_for(pilot, "overview", lambda: not isinstance(app.screen, InstanceScreen))

            # One daemon stops mid-session: shown down, the other stays up.
            mem.stop()
            await wait_for(pilot, "mem down", lambda: m.state is State.DOWN)
            await pilot.pause(0.3)
            assert "down" in cell(app, m, "state") and d.state is State.UP
            table = app.screen.query_one(InstanceTable)
            table.move_cursor(row=table.get_row_index(m.key))
            await pilot.press("c")  # acting on a down instance is refused politely
            await wait_for(
                pilot,
                "refusal",
                lambda: any("mem is down: cannot create a snapshot" in t for t in toasts(app)),
            )
            daemon_factory(instance="mem", storage_url="memory://", disk_size_gb=1)
            await wait_for(pilot, "mem back", lambda: m.state is State.UP)
            await pilot.pause(0.3)
            assert "up" in cell(app, m, "state") and cell(app, m, "size") == "1.0 GiB"
            # A new process, logged as a restart; its charts started again, nothing negative.
            assert any(e.text.startswith("daemon restarted (pid") for e in m.events)
            assert "answering again" not in [e.text for e in m.events]
            assert all(v >= 0 for v in m.history.total_bps)

            # A daemon that stops answering is unresponsive, then recovers.
            disk.process.send_signal(signal.SIGSTOP)
            try:
                await wait_for(pilot, "disk unresponsive", lambda: d.state is State.UNRESPONSIVE)
            finally:
                disk.process.send_signal(signal.SIGCONT)
            await wait_for(pilot, "disk answering", lambda: d.state is State.UP)
            events = [e.text for e in d.events]
            assert "answering again" in events

    asyncio.run(scenario())
    del h

    # The restore really happened: a fresh client reads the snapshot's data.
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.pread(MiB, 0) == disk_pattern(0xAA)
    h.shutdown()
