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
from portalbd.control import requests as rq

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
    return Call(rq.Status().document(), _body("Status"))


def snapshot_list() -> Call[list[dict[str, Any]]]:
    return Call(rq.SnapshotList().document(), _list)


def snapshot_create(name: str) -> Call[dict[str, Any]]:
    return Call(rq.SnapshotCreate(name=name).document(), _body("Snapshot"))


def snapshot_get(name: str) -> Call[dict[str, Any]]:
    return Call(rq.SnapshotGet(name=name).document(), _body("Snapshot"))


def snapshot_delete(name: str) -> Call[None]:
    return Call(rq.SnapshotDelete(name=name).document(), replies.ok)


def snapshot_restore(name: str, force: bool = False) -> Call[None]:
    return Call(rq.SnapshotRestore(name=name, force=force).document(), replies.ok)


def _log(reply: Any) -> list[dict[str, Any]]:
    body: list[Any] = replies.tagged(reply, "Log", list)
    return [item for item in body if isinstance(item, dict)]


def log(lines: int = 100, after: int = -1) -> Call[list[dict[str, Any]]]:
    return Call(rq.Log(lines=lines, after=after).document(), _log)
