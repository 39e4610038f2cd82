"""A failing request is answered EIO and said in the log, rate-limited (issue 20 item 7).

An in-process server (the real ``NbdServer``) over a device whose FLUSH
always fails, reached by a real client (libnbd) over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import cast

import nbd
import pytest

from portalbd.device import Device, DeviceError
from portalbd.nbd.server import NbdLimits, NbdServer
from portalbd.stats import ServerStats


class FailingFlushDevice:
    size = 1 << 20
    block_size = 4096

    def read_nowait(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        return True

    async def flush(self) -> None:
        raise DeviceError("storage unreachable (simulated)")


def test_failing_flush_is_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="portalbd.nbd")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        server = NbdServer(
            cast(Device, FailingFlushDevice()),
            export_name="portalbd",
            description="test",
            stats=ServerStats(),
            max_connections=4,
            limits=NbdLimits(log_burst=3, log_interval=0.5),
        )
        port.append((await server.listen_tcp("127.0.0.1", 0))[1])
        stop.append(asyncio.Event())
        ready.set()
        await stop[0].wait()
        await server.disconnect_all("test over")
        await server.close_listeners()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port[0]}")
    for _ in range(10):
        with pytest.raises(nbd.Error, match="Input/output error"):
            h.flush()
    time.sleep(1.5)  # the window ends; the sweeper says what it suppressed
    h.shutdown()
    loop.call_soon_threadsafe(stop[0].set)
    thread.join(10)
    lines = [r.getMessage() for r in caplog.records]
    failed = [m for m in lines if m.startswith("FLUSH failed")]
    assert len(failed) == 3, lines
    assert "storage unreachable (simulated) (answered EIO)" in failed[0]
    assert any("7 more request-failed messages suppressed" in m for m in lines), lines
