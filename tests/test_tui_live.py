"""The TUI driven by Pilot against real portalbd daemons.

Two instances (one on file storage, one in memory) whose control sockets sit
in a temporary discovery root, so the app finds them the way it finds real
ones. Disk contents are checked with libnbd, snapshots with a raw request on
the control socket (not through the TUI's own client).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest
from textual.pilot import Pilot
from textual.widgets import Input
from textual.widgets._toast import Toast

from tui.app import PortalbdApp
from tui.config import Settings
from tui.model import Instance, State
from tui.screens.dialogs import ConfirmScreen, SnapshotNameScreen
from tui.screens.instance import InstanceScreen
from tui.widgets.tables import InstanceTable, SnapshotTable

pytestmark = pytest.mark.slow

PORTALBD = [sys.executable, "-m", "portalbd.daemon"]
MiB = 1024 * 1024


def control(sock: Path, request: Any, timeout: float = 30.0) -> Any:
    """One raw request, independent of the TUI's client."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


@dataclass
class Daemon:
    name: str
    args: list[str]
    socket: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*PORTALBD, *self.args], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"portalbd {self.name} exited:\n{self.log.read_text()}")
            try:
                control(self.socket, "Status", timeout=2)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"portalbd {self.name} did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def uri(self) -> str:
        address = control(self.socket, "Status")["Status"]["nbd_address"]
        return f"nbd://{address}/portalbd"

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Daemon]]:
    run = tmp_path / "run"
    made: list[Daemon] = []

    def make(name: str, storage: str, gib: int) -> Daemon:
        sock = run / name / "control.sock"
        args = ["--instance", name, "--storage-url", storage, "--disk-size-gb", str(gib)]
        args += ["--nbd-address", "127.0.0.1:0", "--socket", str(sock)]
        d = Daemon(name, args, sock, tmp_path / f"{name}.log")
        made.append(d)
        d.start()
        return d

    try:
        mem = make("mem", "memory://", 1)
        disk = make("disk", f"file://{tmp_path / 'disk-data'}", 2)
        yield run, mem, disk
    finally:
        for d in made:
            d.stop()


async def wait_for(pilot: Pilot[None], what: str, check: Callable[[], bool], limit: float = 30) -> None:
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
    return [str(t.render()) for t in app.screen.query(Toast)]


def disk_pattern(byte: int) -> bytes:
    return bytes([byte]) * MiB


def test_tui_against_real_daemons(daemons: tuple[Path, Daemon, Daemon]) -> None:
    run, mem, disk = daemons
    settings = Settings(roots=(run,), refresh_s=0.2, status_timeout_s=1.0, action_timeout_s=60)
    app = PortalbdApp(settings)

    # Data the snapshot will hold, written before the TUI starts.
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(disk_pattern(0xAA), 0)
    h.flush()

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            # Overview: both discovered, with their sizes.
            await wait_for(pilot, "both up", lambda: len(app.fleet) == 2
                           and all(i.state is State.UP for i in app.fleet))
            await pilot.pause(0.3)
            m, d = find(app, "mem"), find(app, "disk")
            assert cell(app, m, "size") == "1 GiB" and cell(app, d, "size") == "2 GiB"
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
            await pilot.press("ctrl+a", *"bad name")  # hmm: validated while typing
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
            listed = control(disk.socket, "SnapshotList")["SnapshotList"]
            assert [s["name"] for s in listed] == ["before-change"]
            assert any("snapshot before-change created" in t for t in toasts(app))

            # Change the disk, then restore through the UI with the client still
            # attached: the daemon refuses, the TUI says why and offers force.
            h.pwrite(disk_pattern(0x55), 0)
            h.flush()
            await wait_for(pilot, "row", lambda: app.screen.query_one(SnapshotTable).row_count == 1)
            await pilot.press("r")
            await wait_for(pilot, "confirm", lambda: isinstance(app.screen, ConfirmScreen))
            assert "1 client is connected" in str(app.screen.query_one(".dialog--body").render())
            await pilot.press("y")
            await wait_for(
                pilot,
                "force offer",
                lambda: isinstance(app.screen, ConfirmScreen)
                and "refused" in str(app.screen.query_one(".dialog--title").render()),
            )
            reason = str(app.screen.query_one(".dialog--body").render())
            assert "1 NBD client is connected" in reason
            await pilot.press("y")
            await wait_for(
                pilot, "restored", lambda: any("restored to snapshot" in t for t in toasts(app))
            )

            # Delete confirmation, but the snapshot vanishes meanwhile (deleted by
            # someone else): the daemon's error is shown, nothing crashes.
            await pilot.press("d")
            await wait_for(pilot, "delete confirm", lambda: isinstance(app.screen, ConfirmScreen))
            assert control(disk.socket, {"SnapshotDelete": {"name": "before-change"}}) == "Ok"
            await pilot.press("y")
            await wait_for(
                pilot, "error toast", lambda: any("not found" in t for t in toasts(app))
            )
            await pilot.press("escape")
            await wait_for(pilot, "overview", lambda: not isinstance(app.screen, InstanceScreen))

            # One daemon stops mid-session: shown down, the other stays up.
            mem.stop()
            await wait_for(pilot, "mem down", lambda: m.state is State.DOWN)
            await pilot.pause(0.3)
            assert "down" in cell(app, m, "state") and d.state is State.UP
            await pilot.press("c")  # acting on a down instance is refused politely
            await pilot.pause(0.2)
            mem.start()
            await wait_for(pilot, "mem back", lambda: m.state is State.UP)
            await pilot.pause(0.3)
            assert "up" in cell(app, m, "state") and cell(app, m, "size") == "1 GiB"

            # A daemon that stops answering is unresponsive, then recovers.
            disk.signal(signal.SIGSTOP)
            try:
                await wait_for(pilot, "disk unresponsive", lambda: d.state is State.UNRESPONSIVE)
            finally:
                disk.signal(signal.SIGCONT)
            await wait_for(pilot, "disk answering", lambda: d.state is State.UP)
            events = [e.text for e in d.events]
            assert "answering again" in events

    asyncio.run(scenario())
    h.close()

    # The restore really happened: a fresh client reads the snapshot's data.
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.pread(MiB, 0) == disk_pattern(0xAA)
    h.close()
