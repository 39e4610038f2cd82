"""Hostile control-socket clients (issue 20, item 6), against a real daemon.

A member of the socket's group is not the operator: it must not be able to
make the daemon write outside the instance's trace directory, follow a
symlink planted there, truncate an existing file, kill a request with JSON
nested too deep, or sneak a newline into a snapshot name. Every test speaks
raw lines on the real control socket and shows the exact error text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portalbd.control.client import request_once
from portalbd.trace import format
from portalbd.trace.recorder import trace_dir_for
from tests.support import RunningDaemon, Wire, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """One daemon for the whole module: starting one per test would dominate the run."""
    d = start_daemon(tmp_path_factory.mktemp("hardening"), disk_size_gb=1)
    yield d
    if d.stop(timeout=30) != 0:
        raise AssertionError(d.log())


@pytest.fixture
def wire(daemon: RunningDaemon) -> Iterator[Wire]:
    w = Wire(daemon.control_socket)
    yield w
    w.close()


@pytest.fixture
def traces(daemon: RunningDaemon) -> Path:
    return daemon.control_socket.parent / "traces"


def ask(wire: Wire, request: object) -> Any:
    return json.loads(wire.ask(json.dumps(request).encode() + b"\n"))


def test_trace_dir_is_next_to_the_control_socket_unless_systemd_says_otherwise() -> None:
    sock = Path("/run/portalbd/a/control.sock")
    assert trace_dir_for(sock, env={}) == Path("/run/portalbd/a/traces")
    env = {"STATE_DIRECTORY": "/var/lib/portalbd/a:/var/lib/portalbd/extra"}
    assert trace_dir_for(sock, env=env) == Path("/var/lib/portalbd/a/traces")


# --- TraceStart is confined to the instance's trace directory ----------------------


def test_trace_start_refuses_an_absolute_path_outside_the_trace_dir(
    daemon: RunningDaemon, wire: Wire, traces: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "roots-file"
    victim.write_bytes(b"precious\n")
    assert ask(wire, {"TraceStart": {"path": str(victim)}}) == {
        "Error": f"TraceStart: trace path {str(victim)!r} is outside this instance's trace "
        f"directory {str(traces)!r}; give a file name, which is created there"
    }
    assert victim.read_bytes() == b"precious\n"
    assert daemon.status()["recording"] is False


@pytest.mark.parametrize("name", ["../escape.jsonl", "sub/t.jsonl", "..", ".", "", "a\0b"])
def test_trace_start_refuses_names_that_are_not_one_plain_file_name(
    wire: Wire, traces: Path, name: str
) -> None:
    assert ask(wire, {"TraceStart": {"path": name}}) == {
        "Error": f"TraceStart: trace name {name!r} must be a single file name inside "
        f"{str(traces)!r} (no '/', not '.' or '..')"
    }
    assert not (traces.parent / "escape.jsonl").exists()


def test_trace_start_does_not_follow_a_symlink_or_truncate_a_file(
    daemon: RunningDaemon, wire: Wire, traces: Path, tmp_path: Path
) -> None:
    # A first, legal trace creates the directory; then plant a symlink and a file in it.
    assert ask(wire, {"TraceStart": {"path": "first.jsonl"}}) == "Ok"
    assert ask(wire, "TraceStop") == "Ok"
    victim = tmp_path / "roots-file"
    victim.write_bytes(b"precious\n")
    (traces / "link.jsonl").symlink_to(victim)
    for name in ("link.jsonl", "first.jsonl"):
        assert ask(wire, {"TraceStart": {"path": name}}) == {
            "Error": f"TraceStart: trace file {str(traces / name)!r} already exists; "
            "traces are never overwritten, choose another name"
        }
    assert victim.read_bytes() == b"precious\n"
    assert format.describe(traces / "first.jsonl")["complete"]


def test_trace_start_refuses_a_trace_dir_that_is_a_symlink(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, disk_size_gb=1)
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "traces").symlink_to(elsewhere)
        response = d.control({"TraceStart": {"path": "t.jsonl"}})
        assert response == {
            "Error": f"TraceStart: cannot use trace directory {str(tmp_path / 'traces')!r}: "
            "it is a symlink; portalbd does not follow one"
        }
        assert list(elsewhere.iterdir()) == []
    finally:
        assert d.stop(timeout=30) == 0


def test_a_plain_name_is_recorded_in_the_trace_dir_and_a_refusal_keeps_it_going(
    daemon: RunningDaemon, wire: Wire, traces: Path, tmp_path: Path
) -> None:
    assert ask(wire, {"TraceStart": {"path": "live.jsonl.zst", "workload": "w"}}) == "Ok"
    # A refused TraceStart must not stop the recording that is running. The
    # victim is the test's own file: a regression must never clobber the host's.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    assert "Error" in ask(wire, {"TraceStart": {"path": str(victim)}})
    assert victim.read_text() == "precious"
    assert daemon.status()["recording"] is True
    assert ask(wire, "TraceStop") == "Ok"
    info = format.describe(traces / "live.jsonl.zst")
    assert info["workload"] == "w" and info["complete"]
    assert (traces / "live.jsonl.zst").stat().st_mode & 0o777 == 0o640
    # An absolute path that names a file directly in the trace dir is fine too.
    inside = traces / "absolute.jsonl"
    assert ask(wire, {"TraceStart": {"path": str(inside)}}) == "Ok"
    assert ask(wire, "TraceStop") == "Ok"
    assert format.describe(inside)["complete"]


def test_record_flag_does_not_follow_a_symlink(tmp_path: Path) -> None:
    """`--trace` is the operator's own choice of path, but a symlink there is refused."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(victim)
    d = start_daemon(tmp_path, "--trace", str(link), wait=False)
    assert d.process.wait(30) != 0
    assert (
        f"startup failed: cannot record trace to {str(link)!r}: it is a symlink; "
        "portalbd does not follow one"
    ) in d.log()
    assert victim.read_bytes() == b"precious\n"


def test_record_flag_still_truncates_a_regular_file(tmp_path: Path) -> None:
    """The operator's --trace path keeps today's behaviour: create or replace."""
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"old contents\n")
    d = start_daemon(tmp_path, "--trace", str(path), "--workload", "op")
    assert d.stop(timeout=30) == 0
    assert format.describe(path)["workload"] == "op"


# --- JSON nested too deep ------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 5000 + b"]" * 5000 + b"\n",
        b'{"SnapshotCreate":{"name":' + b"[" * 5000 + b"]" * 5000 + b"}}\n",
        b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n",
    ],
    ids=["list", "field", "object"],
)
def test_json_nested_5000_deep_gets_an_error_and_the_connection_lives(
    daemon: RunningDaemon, wire: Wire, line: bytes
) -> None:
    assert wire.ask(line) == b'{"Error":"invalid JSON: nested too deeply"}\n'
    assert wire.ask(b'"SnapshotList"\n').startswith(b'{"SnapshotList":[')
    assert "Status" in request_once(daemon.control_socket, "Status")
    log = daemon.log()
    assert "RecursionError" not in log and "never retrieved" not in log


# --- snapshot names are matched in full ------------------------------------------------


@pytest.mark.parametrize("name", ["s1\n", "s1\r\n", "\ns1"])
def test_snapshot_name_with_a_newline_is_refused(wire: Wire, name: str) -> None:
    response = wire.ask(json.dumps({"SnapshotCreate": {"name": name}}).encode() + b"\n")
    assert response == (
        json.dumps(
            {
                "Error": f"invalid snapshot name {name!r}: use 1-128 letters, digits, '.', "
                "'_' or '-', not starting with '.' or '-'"
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )
    assert b'"name":"s1' not in wire.ask(b'"SnapshotList"\n')


def test_tui_checks_the_whole_name_too() -> None:
    from tui.view import snapshot_name_problem

    assert snapshot_name_problem("s1\n") == "only letters, digits, '.', '_' and '-'"
    assert snapshot_name_problem("s1") is None


def test_fd_count_stays_flat_after_refusals(
    daemon: RunningDaemon, wire: Wire, traces: Path, tmp_path: Path
) -> None:
    """Refused trace opens must not leak the directory descriptor."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    traces.mkdir(exist_ok=True)
    (traces / "taken.jsonl").touch()
    fds = f"/proc/{daemon.process.pid}/fd"
    before = len(os.listdir(fds))
    for _ in range(50):
        assert "outside" in ask(wire, {"TraceStart": {"path": str(victim)}})["Error"]
        assert "already exists" in ask(wire, {"TraceStart": {"path": "taken.jsonl"}})["Error"]
    assert len(os.listdir(fds)) <= before + 2
