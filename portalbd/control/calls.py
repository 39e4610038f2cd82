"""The requests the clients offer as methods, each with the reply shape it must get.

Defined once so the blocking and the asyncio client cannot drift apart: a
client sends `Call.request` and hands the reply to `Call.read`, which
returns the useful part or raises `ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from portalbd.control import replies
from portalbd.control.protocol import request_document

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    request: Any
    read: Callable[[Any], T]


def _body(tag: str) -> Callable[[Any], dict[str, Any]]:
    def read(reply: Any) -> dict[str, Any]:
        body: dict[str, Any] = replies.tagged(reply, tag, dict)
        return body

    return read


def _list(reply: Any) -> list[dict[str, Any]]:
    body: list[Any] = replies.tagged(reply, "SnapshotList", list)
    return [item for item in body if isinstance(item, dict)]


def status() -> Call[dict[str, Any]]:
    return Call(request_document("Status"), _body("Status"))


def snapshot_list() -> Call[list[dict[str, Any]]]:
    return Call(request_document("SnapshotList"), _list)


def snapshot_create(name: str) -> Call[dict[str, Any]]:
    return Call(request_document("SnapshotCreate", name=name), _body("Snapshot"))


def snapshot_get(name: str) -> Call[dict[str, Any]]:
    return Call(request_document("SnapshotGet", name=name), _body("Snapshot"))


def snapshot_delete(name: str) -> Call[None]:
    return Call(request_document("SnapshotDelete", name=name), replies.ok)


def snapshot_restore(name: str, force: bool = False) -> Call[None]:
    return Call(request_document("SnapshotRestore", name=name, force=force), replies.ok)
