"""The control protocol's vocabulary: parsing requests, shaping responses.

Externally tagged JSON, as in the original daemon: a unit request is a bare
string (``"Status"``), one with fields is a one-key object
(``{"SnapshotCreate": {"name": "s1"}}``). Pure: no sockets here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_LINE = 64 * 1024
# Checked with fullmatch: with match() and "$", a trailing newline slips through.
MAX_SNAPSHOT_NAME = 128
SNAPSHOT_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_SNAPSHOT_NAME - 1}}}")


class BadRequest(ValueError):
    """The request line cannot be understood; the message goes back to the client."""


@dataclass(frozen=True, slots=True)
class Request:
    kind: str
    args: dict[str, Any]


# request kind -> {field: (type, required)}
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "Status": {},
    "Metrics": {},
    "SnapshotList": {},
    "SnapshotCreate": {"name": (str, True)},
    "SnapshotGet": {"name": (str, True)},
    "SnapshotDelete": {"name": (str, True)},
    "SnapshotRestore": {"name": (str, True), "force": (bool, False)},
    "TraceStart": {"path": (str, True), "workload": (str, False)},
    "TraceStop": {},
}


def parse_request(line: bytes | str) -> Request:
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    except RecursionError:
        # A line of 5,000 '[' fits in MAX_LINE; json gives up with
        # RecursionError, which is no ValueError and would escape the caller.
        raise BadRequest("invalid JSON: nested too deeply") from None
    args: Any
    if isinstance(doc, str):
        kind, args = doc, {}
    elif isinstance(doc, dict) and len(doc) == 1:
        ((kind, args),) = doc.items()
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadRequest(f"{kind}: fields must be an object")
    else:
        raise BadRequest('expected a request such as "Status" or {"SnapshotCreate": {"name": ...}}')
    schema = SCHEMA.get(kind)
    if schema is None:
        raise BadRequest(f"unknown request {kind!r} (known: {', '.join(sorted(SCHEMA))})")
    for key in args:
        if key not in schema:
            raise BadRequest(f"{kind}: unknown field {key!r}")
    for key, (tp, required) in schema.items():
        if key not in args:
            if required:
                raise BadRequest(f"{kind}: missing field {key!r}")
            continue
        if not isinstance(args[key], tp):
            raise BadRequest(f"{kind}: field {key!r} must be a {tp.__name__}")
    return Request(kind, dict(args))


def request_document(kind: str, **args: Any) -> Any:
    """A request as the wire has it: bare ``"Kind"``, or ``{"Kind": {fields}}``."""
    return {kind: args} if args else kind


def encode_document(document: Any) -> bytes:
    """One request line; clients send documents a caller shaped (portalctl --json, tests) too."""
    return json.dumps(document).encode() + b"\n"


def encode_request(kind: str, **args: Any) -> bytes:
    return encode_document(request_document(kind, **args))


def check_snapshot_name(name: str) -> None:
    if not SNAPSHOT_NAME.fullmatch(name):
        raise BadRequest(
            f"invalid snapshot name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )


def ok() -> dict[str, Any] | str:
    return "Ok"


def error(message: str) -> dict[str, Any]:
    return {"Error": message}


def encode_response(response: Any) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode() + b"\n"
