"""A fixed, made-up fleet: for snapshot tests and the README's screenshots (tui/screenshots.py).

Built by feeding `Instance` the same kind of samples the poller would, at
made-up times, so everything on screen (rates, sparklines, events) is derived
the real way but is identical on every run.
"""

from __future__ import annotations

import math
from pathlib import Path

from tui.model import Fleet, Instance, LogLine, Snapshot, State, Status

T0 = 1_764_000_000.0  # the wall-clock second the demo history starts at
GIB = 1024**3
MIB = 1024**2


def _status(name: str, i: int, *, size: int, url: str, pid: int, wave: float) -> Status:
    """Cumulative counters after `i` one-second steps of a made-up workload."""
    reads = writes = bread = bwritten = flushes = 0
    for k in range(i):
        load = 0.1 + 0.9 * math.sin(k / 7.0 * wave) ** 2
        r, w = int(400 * load * wave), int(250 * (1.2 - load))
        reads += r
        writes += w
        bread += r * 65536
        bwritten += w * 16384
        flushes += 2
    return Status.from_json(
        {
            "instance": name,
            "version": "0.1.0",
            "size_bytes": size,
            "snapshot_count": 2 if name == "db" else 0,
            "storage_url": url,
            "nbd_address": "127.0.0.1:10809" if name == "db" else "127.0.0.1:10810",
            "uptime_s": 3600.0 * 26 + i if name == "db" else 754.0 + i,
            "generation": 3 if name == "db" else 1,
            "pid": pid,
            "stats": {
                "connections": 2 if name == "db" else 1,
                "connections_total": 7 if name == "db" else 1,
                "commands": {"read": reads, "write": writes, "flush": flushes},
                "inflight": 3,
                "bytes_read": bread,
                "bytes_written": bwritten,
                "latency_us": {
                    "read": {"p50": 90, "p99": 310 + 40 * (i % 5), "max": 1200},
                    "write": {"p50": 140, "p99": 620 + 90 * (i % 3), "max": 2900},
                },
                "flush_latency_us": {"p50": 2100, "p99": 8400, "max": 15000},
                "dirty_bytes": 3 * MIB + 65536 * (i % 4),
                "cached_bytes": 48 * MIB,
                "used_bytes": int(size * (0.37 if name == "db" else 0.08)),
                "allocated_bytes": int(size * (0.31 if name == "db" else 0.05)) // 65536 * 65536,
            },
        }
    )


def demo_fleet(points: int = 90) -> Fleet:
    fleet = Fleet()
    db, _ = fleet.add(Path("/run/portalbd/db/control.sock"))
    scratch, _ = fleet.add(Path("/run/user/1000/portalbd/scratch/control.sock"))
    backup, _ = fleet.add(Path("/run/portalbd/backup/control.sock"))
    for inst, size, url, pid, wave in (
        (db, 64 * GIB, "s3://disks/prod/db", 4711, 1.0),
        (scratch, 8 * GIB, "file:///var/lib/portalbd/scratch", 5120, 0.4),
    ):
        for i in range(points):
            inst.record_status(
                float(i), T0 + i, _status(inst.name, i, size=size, url=url, pid=pid, wave=wave)
            )
    db.set_snapshots(
        [
            Snapshot(
                name="before-upgrade",
                id="1",
                created_at=T0 - 86400 * 3,
                generation=1,
                size_bytes=21 * GIB,
            ),
            Snapshot(
                name="nightly-2025-11-23",
                id="2",
                created_at=T0 - 3600 * 5,
                generation=2,
                size_bytes=23 * GIB + 512 * MIB,
            ),
        ]
    )
    db.log(T0 + 40, "info", "snapshot nightly-2025-11-23 created")
    db.add_daemon_log(
        [
            LogLine(seq=n, wall=T0 + at, level=level, logger=logger, message=message)
            for n, (at, level, logger, message) in enumerate(
                [
                    (0, "info", "portalbd", "portalbd 0.1.0 started instance=db size=68719476736"),
                    (2, "info", "portalbd.nbd", "client connected peer=10.0.0.7:51234 tls=True"),
                    (39, "info", "portalbd", "snapshot created name=nightly-2025-11-23 in 41 ms"),
                    (61, "warning", "portalbd.nbd", "2 requests failed: storage timeout"),
                ]
            )
        ]
    )
    db.log(T0 + 61, "error", "2 NBD requests failed")
    scratch.set_snapshots([])
    backup.record_failure(T0 + 10, State.DOWN, "connection refused (daemon not running)")
    return fleet


def instance(fleet: Fleet, name: str) -> Instance:
    found = next((i for i in fleet if i.name == name), None)
    assert found is not None, name
    return found
