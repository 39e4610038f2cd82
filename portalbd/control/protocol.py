"""The control protocol's vocabulary: parsing requests, shaping responses.

Externally tagged JSON, as in the original daemon: a unit request is a bare
string (``"Status"``), one with fields is a one-key object
(``{"SnapshotCreate": {"name": "s1"}}``). Pure: no sockets here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, cast

import msgspec

from portalbd.control.requests import KINDS, AnyRequest

MAX_LINE = 64 * 1024
# Checked with fullmatch: with match() and "$", a trailing newline slips through.
MAX_SNAPSHOT_NAME = 128
SNAPSHOT_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_SNAPSHOT_NAME - 1}}}")


class BadRequest(ValueError):
    """The request line cannot be understood; the message goes back to the client."""


def parse_request(line: bytes | str) -> AnyRequest:
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
    return Request(kind, args)


# msgspec's words for a field of the wrong type, e.g. "Expected `str`, got `int` - at `$.name`"
_WRONG_TYPE = re.compile(r"Expected `(?P<type>[^`]+)`, got `[^`]+` - at `\$\.(?P<field>.+)`")


def Request(kind: str, args: Mapping[str, Any]) -> AnyRequest:
    """The request ``kind`` with the fields ``args``, checked against its struct.

    Named like the dataclass it replaced (built as ``Request(kind, args)``).
    Unknown and missing fields are looked for first, in the struct's field
    order, so a line with several faults is answered about the same one as
    ever; msgspec then checks the types, and its message is put in the
    words scripts already match.
    """
    cls = KINDS.get(kind)
    if cls is None:
        raise BadRequest(f"unknown request {kind!r} (known: {', '.join(sorted(KINDS))})")
    fields = msgspec.structs.fields(cls)
    names = {f.name for f in fields}
    for key in args:
        if key not in names:
            raise BadRequest(f"{kind}: unknown field {key!r}")
    for f in fields:
        if f.required and f.name not in args:
            raise BadRequest(f"{kind}: missing field {f.name!r}")
    ordered = {f.name: args[f.name] for f in fields if f.name in args}  # type errors in order
    try:
        request = cast("AnyRequest", msgspec.convert(ordered, cls, strict=True))
    except msgspec.ValidationError as exc:
        wrong = _WRONG_TYPE.fullmatch(str(exc))
        if wrong is None:
            raise BadRequest(f"{kind}: {exc}") from None
        raise BadRequest(f"{kind}: field {wrong['field']!r} must be a {wrong['type']}") from None
    return request


def request_document(kind: str, **args: Any) -> Any:
    """A request as the wire has it: bare ``"Kind"``, or ``{"Kind": {fields}}``."""
    return {kind: args} if args else kind


def encode_document(document: Any) -> bytes:
    """One request line; clients send documents a caller shaped (portalctl --json, tests) too."""
    return json.dumps(document).encode() + b"\n"


def encode_request(kind: str, **args: Any) -> bytes:
    return encode_document(request_document(kind, **args))


def snapshot_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a snapshot, in a few words, or None if it can.

    The one rule, shared by the daemon (`check_snapshot_name`) and the TUI's
    prompt, which checks while typing: the regex decides, the rest only says
    which part of it the name breaks.
    """
    if SNAPSHOT_NAME.fullmatch(name):
        return None
    if not name:
        return "a name is required"
    if len(name) > MAX_SNAPSHOT_NAME:
        return f"at most {MAX_SNAPSHOT_NAME} characters"
    if not SNAPSHOT_NAME.fullmatch(name[0]):
        return "must start with a letter or digit (or '_')"
    return "only letters, digits, '.', '_' and '-'"


def check_snapshot_name(name: str) -> None:
    if snapshot_name_problem(name) is not None:
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
