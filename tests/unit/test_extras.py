"""Tools that need an optional extra say which one when it is missing.

Each case runs the real console entry point in a fresh interpreter in which
the extra's module cannot be imported (``sys.modules[name] = None`` makes
any import of it fail, as an uninstalled package would).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portalbd.extras import EXTRA_OF_MODULE, missing_extra_message


def run_without(module: str, entry: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        f"from {entry.rsplit('.', 1)[0]} import {entry.rsplit('.', 1)[1]} as main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_csi_driver_without_grpc_names_the_csi_extra() -> None:
    result = run_without("grpc", "portalbd.csi.entry.main", "--help")
    assert result.returncode == 1, result.stderr
    assert "portalbd-csi needs portalbd's [csi] extra, and grpc is not installed" in result.stderr
    assert "pip install 'portalbd[csi]'" in result.stderr


def test_trace_replay_without_numpy_names_the_trace_extra(tmp_path: Path) -> None:
    result = run_without(
        "numpy",
        "portalbd.trace.cli.main",
        "replay",
        str(tmp_path / "missing.jsonl"),
        "--uri",
        "nbd://127.0.0.1:1",
    )
    assert result.returncode == 1, result.stderr
    assert "needs portalbd's [trace] extra, and numpy is not installed" in result.stderr


@pytest.mark.parametrize("command", ["replay", "bench"])
def test_trace_tools_without_libnbd_say_where_it_comes_from(command: str, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"format":"portalbd-trace","version":1,"workload":"w","device_size_bytes":1}\n'
    )
    args = [command, str(trace), "--uri", "nbd://127.0.0.1:1"]
    result = run_without("nbd", "portalbd.trace.cli.main", *args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"portalbd-trace: portalbd-trace {command} needs libnbd's ")
    assert "Python module (nbd), which is not installed" in result.stderr
    assert "apt install python3-libnbd" in result.stderr


def test_daemon_and_portalctl_import_no_extra() -> None:
    code = (
        "import sys\n"
        "import portalbd.daemon, portalbd.portalctl\n"
        f"loaded = sorted({{n.split('.')[0] for n in sys.modules}} & {set(EXTRA_OF_MODULE)!r})\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["numpy.linalg", "matplotlib"])
def test_message_names_the_root_module(name: str) -> None:
    message = missing_extra_message(ImportError("x", name=name), "tool")
    assert message is not None and f"{name.split('.')[0]} is not installed" in message


def test_unrelated_import_errors_are_not_blamed_on_an_extra() -> None:
    assert missing_extra_message(ImportError("x", name="portalbd.nothing"), "tool") is None
