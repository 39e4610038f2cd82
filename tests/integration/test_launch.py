"""`portalbd.launch`: how tests, benchmarks and trace tools start and stop daemons.

Real processes throughout: the daemon itself, and small Python children that
stand in for a server that never listens or a process that ignores SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd import launch
from portalbd.launch import LaunchError


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def python_child(code: str, started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    process = launch.spawn([sys.executable, "-c", code], None)
    started.append(process)
    return process


def test_the_daemon_of_this_install_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTALBD_BIN", raising=False)
    assert launch.portalbd_command() == [sys.executable, "-m", "portalbd.daemon"]
    monkeypatch.setenv("PORTALBD_BIN", "/opt/other/portalbd --flag")
    assert launch.portalbd_command() == ["/opt/other/portalbd", "--flag"]


def test_start_waits_until_nbd_and_control_answer(tmp_path: Path) -> None:
    socket = tmp_path / "elsewhere" / "ctl.sock"
    daemon = launch.start(tmp_path, "--socket", str(socket), instance="ready")
    try:
        assert daemon.control_socket == socket  # the --socket it was given, not the default
        assert daemon.status()["nbd_address"] == f"127.0.0.1:{daemon.port}"
        assert daemon.uri == f"nbd://127.0.0.1:{daemon.port}"
    finally:
        assert daemon.stop() == 0
    assert "started" in daemon.log()


def test_a_daemon_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as caught:
        launch.start(tmp_path, "--block-size", "3", instance="bad")
    message = str(caught.value)
    assert re.match(r"portalbd \(port \d+\) exited with status 2 while starting\n--- ", message)
    assert "device.block_size: must be a power of two from 4096 to 1048576, got 3" in message


def test_a_server_that_never_listens_times_out(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    sleeper = python_child("import time; time.sleep(60)", children)
    port = launch.free_port()
    with pytest.raises(LaunchError, match=rf"^sleeper \(port {port}\) was not ready within 0.3s$"):
        launch.wait_for_port(port, sleeper, 0.3, "sleeper")


def test_stop_kills_what_ignores_sigterm(children: list[subprocess.Popen[bytes]]) -> None:
    stubborn = python_child(
        "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n",
        children,
    )
    # Give it time to install the handler: SIGTERM before that would just end it.
    launch.wait_until(lambda: _ignores_sigterm(stubborn.pid), stubborn, 30, "stubborn")
    with pytest.raises(
        LaunchError, match=r"^stubborn did not exit within 0.3s of SIGTERM; killed$"
    ):
        launch.stop_process(stubborn, 0.3, "stubborn")
    assert stubborn.poll() == -9


def _ignores_sigterm(pid: int) -> bool:
    """Whether SIGTERM (15) is in the process's ignored-signal mask (/proc status SigIgn)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << 14))
    return False


def test_the_async_wait_fails_when_the_child_exits(
    children: list[subprocess.Popen[bytes]],
) -> None:
    quitter = python_child("raise SystemExit(3)", children)

    async def never() -> bool:
        return False

    with pytest.raises(LaunchError, match=r"^quitter exited with status 3 while starting$"):
        asyncio.run(launch.wait_until_async(never, quitter.poll, 30, "quitter"))


def test_a_zombie_is_not_alive(children: list[subprocess.Popen[bytes]]) -> None:
    """Killed and not yet reaped (what an orphan is until PID 1 gets to it)."""
    sleeper = python_child("import time\ntime.sleep(60)\n", children)
    assert launch.pid_alive(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    launch.wait_until(lambda: not launch.pid_alive(sleeper.pid), None, 10, "the zombie", 0.01)
    assert Path(f"/proc/{sleeper.pid}").exists()  # still there: a zombie, not reaped
    assert sleeper.wait(10) == -9
    assert not launch.pid_alive(sleeper.pid)


def test_the_async_stop_kills_what_ignores_sigterm(
    children: list[subprocess.Popen[bytes]],
) -> None:
    stubborn = python_child(
        "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n",
        children,
    )
    launch.wait_until(lambda: _ignores_sigterm(stubborn.pid), stubborn, 30, "stubborn")
    with pytest.raises(
        LaunchError, match=r"^stubborn did not exit within 0.3s of SIGTERM; killed$"
    ):
        asyncio.run(
            launch.stop_async(stubborn.pid, lambda: stubborn.poll() is not None, 0.3, "stubborn")
        )
    assert stubborn.wait(10) == -9
