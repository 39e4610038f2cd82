"""Control requests to instance actions: what each request kind does.

The protocol module decodes and checks requests; the instance does the
work. This is the table between them, so adding a request touches the
protocol, this file and the instance method it calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from portalbd.control import protocol as cp

if TYPE_CHECKING:
    from portalbd.instance import Instance


async def dispatch(instance: Instance, request: cp.Request) -> Any:
    """Answer one decoded control request (the reply document, or an error)."""
    kind = request.kind
    args = request.args
    if kind == "Status":
        return {"Status": instance.status()}
    if kind == "Metrics":
        return {"Metrics": instance.status()["stats"]}
    if kind == "SnapshotList":
        assert instance.store is not None
        return {"SnapshotList": [s.public() for s in instance.store.catalog.snapshots]}
    if kind == "SnapshotGet":
        assert instance.store is not None
        record = instance.store.catalog.find(args["name"])
        if record is None:
            return cp.error(f"snapshot {args['name']!r} not found")
        return {"Snapshot": record.public()}
    if kind == "SnapshotCreate":
        cp.check_snapshot_name(args["name"])
        return {"Snapshot": await instance.create_snapshot(args["name"])}
    if kind == "SnapshotDelete":
        await instance.delete_snapshot(args["name"])
        return "Ok"
    if kind == "SnapshotRestore":
        await instance.restore(args["name"], force=bool(args.get("force", False)))
        return "Ok"
    if kind == "TraceStart":
        instance.start_control_trace(args["path"], args.get("workload", "unnamed"))
        return "Ok"
    if kind == "TraceStop":
        if not instance.stop_trace():
            return cp.error("no trace is being recorded")
        return "Ok"
    return cp.error(f"unhandled request {kind}")
