"""``--profile``: a CPU flame graph of the daemon, by py-spy.

py-spy samples the process from outside, so the daemon runs at full speed
and nothing in the hot path knows it is being watched.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

log = logging.getLogger("portalbd.profile")


class Profiler:
    def __init__(self, output: Path) -> None:
        self.output = output
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            log.error(
                "--profile needs py-spy, of the [trace] extra (pip install 'portalbd[trace]'); "
                "continuing without it"
            )
            return
        self._process = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(os.getpid()),
                "--output",
                str(self.output),
                "--format",
                "flamegraph",
                "--rate",
                "250",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        log.info("profiling with py-spy output=%s", self.output)

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            err = b""
        if self.output.exists():
            log.info("flame graph written to %s", self.output)
        else:
            log.error("py-spy wrote no flame graph: %s", err.decode(errors="replace").strip())
