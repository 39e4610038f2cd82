"""The control requests as types: one struct per request kind, its fields typed.

The structs are the schema: the server checks a request line against them
(`protocol.parse_request`), `dispatch` matches on them, and the clients build
their requests from them, so a field renamed or retyped changes all three.
On the wire a request stays externally tagged (``"Status"``,
``{"SnapshotCreate": {"name": "s1"}}``); the class name is the tag.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every request shares: its kind is its class name, its fields are its body."""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def document(self) -> Any:
        """The request as the wire has it: bare ``"Kind"``, or ``{"Kind": {fields}}``."""
        fields = msgspec.structs.asdict(self)
        return {self.kind: fields} if fields else self.kind


class Status(Message, frozen=True):
    pass


class Metrics(Message, frozen=True):
    pass


class SnapshotList(Message, frozen=True):
    pass


class SnapshotCreate(Message, frozen=True):
    name: str


class SnapshotGet(Message, frozen=True):
    name: str


class SnapshotDelete(Message, frozen=True):
    name: str


class SnapshotRestore(Message, frozen=True):
    name: str
    force: bool = False


class TraceStart(Message, frozen=True):
    path: str
    workload: str = "unnamed"


class TraceStop(Message, frozen=True):
    pass


class Log(Message, frozen=True):
    """The daemon's recent log records: the newest `lines` with a sequence number above `after`."""

    lines: int = 100
    after: int = -1


AnyRequest = (
    Status
    | Metrics
    | SnapshotList
    | SnapshotCreate
    | SnapshotGet
    | SnapshotDelete
    | SnapshotRestore
    | TraceStart
    | TraceStop
    | Log
)

KINDS: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (
        Status,
        Metrics,
        SnapshotList,
        SnapshotCreate,
        SnapshotGet,
        SnapshotDelete,
        SnapshotRestore,
        TraceStart,
        TraceStop,
        Log,
    )
}
