"""portalctl against a real daemon: every command, every error path, exit codes.

The tool runs as the installed console script (a subprocess), so the exit
status, stdout/stderr split and argument parsing are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from portalbd.paths import control_socket_path
from tests.conftest import DaemonFactory
from tests.support import BIN, RunningDaemon, connected

PORTALCTL = str(BIN / "portalctl")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def ctl(
    *args: str, user: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    command = [PORTALCTL, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def sock(daemon: RunningDaemon) -> list[str]:
    return ["--socket", str(daemon.control_socket)]


def test_snapshot_commands_human_output(daemon: RunningDaemon) -> None:
    listed = ctl(*sock(daemon), "snapshot", "list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "No snapshots\n", "")

    created = ctl(*sock(daemon), "snapshot", "create", "before-upgrade")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert lines[0] == "Snapshot: before-upgrade"
    assert lines[1].startswith("  ID:      ") and UUID.match(lines[1].split()[-1])
    assert re.fullmatch(r"  Created: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", lines[2])
    assert lines[3] == "  Written: 0 B"
    snap_id = lines[1].split()[-1]

    got = ctl(*sock(daemon), "snapshot", "get", "before-upgrade")
    assert got.returncode == 0 and got.stdout.splitlines()[:2] == lines[:2]

    with connected(daemon.uri) as handle:
        handle.pwrite(b"x" * 65536 * 4, 0)
        handle.flush()
    ctl(*sock(daemon), "snapshot", "create", "s2")
    table = ctl(*sock(daemon), "snapshot", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "CREATED", "WRITTEN"]
    assert table[1].split()[:2] == ["before-upgrade", snap_id]
    assert table[1].endswith("0 B") and table[2].endswith("256.0 KiB")
    assert table[2].startswith("s2 ")

    restored = ctl(*sock(daemon), "snapshot", "restore", "before-upgrade")
    assert (restored.returncode, restored.stdout) == (
        0,
        "OK\nRestored before-upgrade: now generation 2, 0 clients disconnected\n",
    )
    deleted = ctl(*sock(daemon), "snapshot", "delete", "before-upgrade")
    assert (deleted.returncode, deleted.stdout) == (0, "OK\n")
    assert [r.split()[0] for r in ctl(*sock(daemon), "snapshot", "list").stdout.splitlines()] == [
        "NAME",
        "s2",
    ]


def test_status_human_output(daemon: RunningDaemon) -> None:
    with connected(daemon.uri) as handle:
        handle.pwrite(b"y" * 8192, 0)
        handle.pread(4096, 0)
        status = ctl(*sock(daemon), "status")
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert out.startswith("portalbd daemon status:\n")
    fields = dict(
        (label.strip(), value.strip())
        for label, _, value in (line.partition(":") for line in out.splitlines()[1:])
    )
    assert fields["Instance"] == "t"
    assert fields["Size"] == "1.0 GiB"
    assert fields["Blocks"] == "16384 x 64.0 KiB"
    assert fields["Snapshots"] == "0"
    assert fields["NBD"] == f"127.0.0.1:{daemon.port}"
    assert fields["TLS"] == "off"
    assert fields["Storage"].startswith("memory") and fields["Storage"].endswith("(generation 1)")
    # The total also counts the readiness probe of start_daemon.
    assert fields["Clients"].startswith("1 connected, ")
    assert fields["Reads"] == "1 (4.0 KiB)"
    assert fields["Writes"] == "1 (8.0 KiB)"
    assert fields["Uptime"].endswith("s")
    assert "Latency write" in fields


def test_memory_storage_warns_it_is_ephemeral(
    daemon: RunningDaemon, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A memory disk says, in the log, status and portalctl, that it dies with the daemon."""
    assert (
        "warning instance=t portalbd: storage is memory://: the disk lives only in "
        "this process's RAM and everything written to it is lost when portalbd exits; "
        "give --storage-url file:///abs/dir or s3://bucket/prefix to keep it"
    ) in daemon.log()
    assert daemon.status()["ephemeral"] is True
    warning = [
        " ".join(line.split())
        for line in ctl(*sock(daemon), "status").stdout.splitlines()
        if line.lstrip().startswith("Warning:")
    ]
    assert warning == [
        "Warning: memory storage: everything on the disk is lost when the daemon exits"
    ]
    # A disk that persists says none of it.
    file_daemon = daemon_factory(storage_url=f"file://{tmp_path}/data", instance="f")
    assert file_daemon.status()["ephemeral"] is False
    assert "storage is memory://" not in file_daemon.log()
    assert "Warning:" not in ctl(*sock(file_daemon), "status").stdout


def test_record_start_and_stop(daemon: RunningDaemon) -> None:
    """portalctl record: TraceStart and TraceStop without hand-written JSON."""
    from portalbd.trace.format import describe

    started = ctl(*sock(daemon), "record", "start", "t.jsonl.zst", "--workload", "mkfs")
    assert (started.returncode, started.stderr) == (0, "")
    assert started.stdout == (
        "OK\nRecording every NBD request into t.jsonl.zst in the instance's trace "
        "directory; stop with: portalctl record stop\n"
    )
    assert "Recording:" in ctl(*sock(daemon), "status").stdout
    with connected(daemon.uri) as handle:
        handle.pwrite(b"r" * 4096, 0)
        handle.flush()
    stopped = ctl(*sock(daemon), "record", "stop")
    assert (stopped.returncode, stopped.stdout) == (
        0,
        "OK\nRecording stopped; the trace file is complete\n",
    )
    info = describe(daemon.control_socket.parent / "traces" / "t.jsonl.zst")
    assert info["workload"] == "mkfs" and info["complete"] and info["counts"]["Write"] == 1
    # What a user gets wrong, said by the daemon.
    again = ctl(*sock(daemon), "record", "stop")
    assert (again.returncode, again.stdout, again.stderr) == (
        1,
        "",
        "Error: no trace is being recorded\n",
    )
    taken = ctl(*sock(daemon), "record", "start", "t.jsonl.zst")
    assert taken.returncode == 1 and taken.stderr.startswith("Error: TraceStart: trace file ")
    assert "already exists; traces are never overwritten" in taken.stderr
    outside = ctl(*sock(daemon), "record", "start", "../t.jsonl")
    assert outside.returncode == 1
    assert "must be a single file name inside" in outside.stderr
    assert json.loads(ctl("--json", *sock(daemon), "record", "stop").stdout) == {
        "Error": "no trace is being recorded"
    }


def test_log_prints_the_daemons_recent_lines(daemon: RunningDaemon) -> None:
    assert ctl(*sock(daemon), "snapshot", "create", "logged").returncode == 0
    shown = ctl(*sock(daemon), "log", "-n", "3")
    assert (shown.returncode, shown.stderr) == (0, "")
    lines = shown.stdout.splitlines()
    assert len(lines) == 3 and "snapshot created name=logged" in shown.stdout
    # The lines the daemon wrote to stderr, as it wrote them (less "instance=t").
    stderr = [re.sub(r"^(\S+ \S+ +)instance=t ", r"\1", x) for x in daemon.log().splitlines()]
    assert [line for line in lines if line not in stderr] == [], stderr[-10:]
    doc = json.loads(ctl("--json", *sock(daemon), "log", "--lines", "2").stdout)
    assert [set(e) for e in doc["Log"]] == [{"seq", "time", "level", "logger", "message"}] * 2
    assert doc["Log"][0]["seq"] < doc["Log"][1]["seq"]
    refused = ctl(*sock(daemon), "log", "-n", "0")
    assert (refused.returncode, refused.stderr) == (
        1,
        "Error: Log: lines must be at least 1, not 0\n",
    )


@contextlib.contextmanager
def answering_once(path: Path, reply: bytes) -> Iterator[None]:
    """A control socket that reads one request, sends ``reply`` (maybe none) and hangs up."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        if reply:
            conn.sendall(reply)
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(5)
        server.close()


def test_log_from_a_daemon_older_than_the_request(tmp_path: Path) -> None:
    """What an older portalbd answers to `Log` (it has no such request), said plainly."""
    path = tmp_path / "old.sock"
    with answering_once(path, b'{"Error":"unknown request \'Log\' (known: Metrics, Status)"}\n'):
        result = ctl("--socket", str(path), "log")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("Error: this daemon is older than the Log request")


def test_json_prints_the_raw_response(daemon: RunningDaemon) -> None:
    created = ctl("--json", *sock(daemon), "snapshot", "create", "j1")
    assert created.returncode == 0
    doc = json.loads(created.stdout)
    assert set(doc) == {"Snapshot"} and doc["Snapshot"]["name"] == "j1"
    assert json.loads(ctl("--json", *sock(daemon), "snapshot", "list").stdout) == {
        "SnapshotList": [doc["Snapshot"]]
    }
    status = json.loads(ctl("--json", *sock(daemon), "status").stdout)["Status"]
    assert status["snapshot_count"] == 1 and status["instance"] == "t"
    assert json.loads(ctl("--json", *sock(daemon), "snapshot", "delete", "j1").stdout) == "Ok"
    # A refusal is still the daemon's JSON, on stdout, with exit status 1.
    missing = ctl("--json", *sock(daemon), "snapshot", "get", "j1")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"Error": "snapshot 'j1' not found"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["snapshot", "get", "nope"], "Error: snapshot 'nope' not found\n"),
        (["snapshot", "delete", "nope"], "Error: snapshot 'nope' not found\n"),
        (["snapshot", "restore", "nope"], "Error: snapshot 'nope' not found\n"),
        (
            ["snapshot", "create", "a/b"],
            "Error: invalid snapshot name 'a/b': use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'\n",
        ),
        (["snapshot", "create", "dup"], "Error: snapshot 'dup' already exists\n"),
    ],
)
def test_daemon_refusals(daemon: RunningDaemon, args: list[str], message: str) -> None:
    assert ctl(*sock(daemon), "snapshot", "create", "dup").returncode == 0
    result = ctl(*sock(daemon), *args)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", message)


def test_restore_pauses_a_client_then_forced(daemon: RunningDaemon) -> None:
    ctl(*sock(daemon), "snapshot", "create", "s")
    with connected(daemon.uri) as handle:
        paused = ctl(*sock(daemon), "snapshot", "restore", "s")
        assert (paused.returncode, paused.stderr) == (0, "")
        assert re.fullmatch(
            r"OK\nRestored s: now generation 2, I/O of 1 client paused for \d+\.\d ms\n",
            paused.stdout,
        ), paused.stdout
        handle.pread(4096, 0)  # still attached
        forced = ctl(*sock(daemon), "snapshot", "restore", "s", "--force")
        assert (forced.returncode, forced.stdout) == (
            0,
            "OK\nRestored s: now generation 3, 1 client disconnected\n",
        )
    # --json keeps the reply as the daemon sent it; status tells the rest
    assert ctl(*sock(daemon), "snapshot", "restore", "s", "--json").stdout == '"Ok"\n'
    last = json.loads(ctl(*sock(daemon), "status", "--json").stdout)["Status"]["last_restore"]
    assert (last["name"], last["generation"], last["disconnected"], last["paused"]) == (
        "s",
        4,
        0,
        0,
    )


def test_global_flags_anywhere(daemon: RunningDaemon) -> None:
    path = str(daemon.control_socket)
    ctl("-s", path, "snapshot", "create", "g")
    before = ctl("--json", "-s", path, "snapshot", "list")
    after = ctl("snapshot", "list", "--json", "-s", path)
    middle = ctl("snapshot", "--json", "list", "--socket", path)
    assert before.returncode == after.returncode == middle.returncode == 0, after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(middle.stdout)
    assert json.loads(after.stdout)["SnapshotList"][0]["name"] == "g"
    status = ctl("status", "-s", path, "--timeout", "5")
    assert status.returncode == 0 and status.stdout.startswith("portalbd daemon status:")
    both = ctl("-i", "x", "status", "-s", path)
    assert both.returncode == 2
    assert "argument -i/--instance: not allowed with argument -s/--socket" in both.stderr


def test_instance_finds_the_default_socket(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    name = f"pctl-{uuid.uuid4().hex[:8]}"
    path = control_socket_path(name)
    daemon = daemon_factory("--socket", str(path), instance=name)
    try:
        status = ctl("--instance", name, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["Status"]["control_socket"] == str(path)
    finally:
        daemon.stop()
        shutil.rmtree(path.parent, ignore_errors=True)


def test_instance_not_running() -> None:
    name = f"absent-{uuid.uuid4().hex[:8]}"
    result = ctl("--instance", name, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"Error: no portalbd instance '{name}' seems to be running: its control socket "
        f"{control_socket_path(name)} does not exist (start it with `portalbd --instance {name}`, "
        "or pass --socket PATH)"
    )


def test_socket_missing(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    result = ctl("--socket", str(path), "snapshot", "list")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"Error: control socket {path} does not exist: is the daemon running?\n"


def test_stale_socket_is_connection_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nobody listens: what a killed daemon leaves
    result = ctl("--socket", str(path), "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: connection refused on control socket {path}: the socket is stale, "
        "no daemon is running there\n"
    )


def test_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "plain-file"
    path.write_text("")
    result = ctl("--socket", str(path), "status")
    assert (result.returncode, result.stderr) == (1, f"Error: {path} is not a control socket\n")


def test_permission_denied(daemon_factory: DaemonFactory) -> None:
    """The socket is 0660: another user (not in the group) is turned away."""
    if os.getuid() != 0:
        pytest.skip("needs root to run portalctl as another user")
    base = Path(f"/tmp/portalbd-perm-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o755)
    try:
        daemon = daemon_factory(workdir=base)
        assert (daemon.control_socket.stat().st_mode & 0o777) == 0o660
        result = ctl("--socket", str(daemon.control_socket), "status", user="nobody")
        assert result.returncode == 1
        assert result.stderr == (
            f"Error: permission denied on control socket {daemon.control_socket} "
            "(run as the daemon's user or a member of its group, or as root)\n"
        )
        daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def silent_server(tmp_path: Path) -> Iterator[Path]:
    """Accepts connections and never answers: a wedged daemon."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_timeout(silent_server: Path) -> None:
    result = ctl("--socket", str(silent_server), "--timeout", "0.5", "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: no answer from the daemon on {silent_server} within 0.5s "
        "(it may still be working on the request)\n"
    )


def test_garbage_reply(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sock"
    with answering_once(path, b"HTTP/1.1 400 Bad Request\n"):
        result = ctl("--socket", str(path), "status")
    assert result.returncode == 1
    assert result.stderr == "Error: reply is not JSON: b'HTTP/1.1 400 Bad Request'\n"


def test_daemon_closes_without_answer(tmp_path: Path) -> None:
    path = tmp_path / "closer.sock"
    with answering_once(path, b""):
        result = ctl("--socket", str(path), "status")
    assert (result.returncode, result.stderr) == (
        1,
        f"Error: the daemon closed control socket {path}\n",
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--socket", "/x", "--instance", "y", "status"], "not allowed with argument"),
        ([], "the following arguments are required: COMMAND"),
        (["snapshot"], "the following arguments are required: ACTION"),
        (["snapshot", "create"], "the following arguments are required: name"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["--timeout", "soon", "status"], "invalid float value: 'soon'"),
    ],
)
def test_usage_errors(args: list[str], fragment: str) -> None:
    result = ctl(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: portalctl")
    assert fragment in result.stderr


def test_help_lists_the_commands() -> None:
    result = ctl("--help")
    assert result.returncode == 0
    for word in ("status", "snapshot", "--instance", "--socket", "--json", "--timeout"):
        assert word in result.stdout
    restore = ctl("snapshot", "restore", "--help")
    assert "--force" in restore.stdout
