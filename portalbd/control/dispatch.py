"""Control requests to instance actions: what each request kind does.

The protocol module decodes and checks requests into the structs of
`control/requests.py`; the instance does the work. This is the table
between them, so adding a request touches the struct, this file and the
instance method it calls (mypy insists on the last two: the match is
exhaustive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, assert_never

from portalbd.control import protocol as cp
from portalbd.control import requests as rq
from portalbd.log import recent as recent_log

if TYPE_CHECKING:
    from portalbd.instance import Instance


async def dispatch(instance: Instance, request: rq.AnyRequest) -> Any:
    """Answer one decoded control request (the reply document, or an error)."""
    match request:
        case rq.Status():
            return {"Status": instance.status()}
        case rq.Metrics():
            return {"Metrics": instance.status()["stats"]}
        case rq.SnapshotList():
            assert instance.store is not None
            return {"SnapshotList": [s.public() for s in instance.store.catalog.snapshots]}
        case rq.SnapshotGet(name=name):
            assert instance.store is not None
            record = instance.store.catalog.find(name)
            if record is None:
                return cp.error(f"snapshot {name!r} not found")
            return {"Snapshot": record.public()}
        case rq.SnapshotCreate(name=name):
            cp.check_snapshot_name(name)
            return {"Snapshot": await instance.create_snapshot(name)}
        case rq.SnapshotDelete(name=name):
            await instance.delete_snapshot(name)
            return "Ok"
        case rq.SnapshotRestore(name=name, force=force):
            await instance.restore(name, force=force)
            return "Ok"
        case rq.TraceStart(path=path, workload=workload):
            instance.start_control_trace(path, workload)
            return "Ok"
        case rq.TraceStop():
            if not instance.stop_trace():
                return cp.error("no trace is being recorded")
            return "Ok"
        case rq.Log(lines=lines, after=after):
            # The process's ring (portalbd.log), not the instance's: a daemon is one instance.
            if lines < 1:
                return cp.error(f"Log: lines must be at least 1, not {lines}")
            return {"Log": recent_log.tail(lines, after)}
        case _:
            assert_never(request)
