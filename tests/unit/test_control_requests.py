"""The control requests as structs: what a line becomes, and back.

The golden byte tests (tests/integration/test_control_protocol.py) pin one
fault per line against a real daemon; these pin the pure parts the structs
took over from the hand-written schema.
"""

from __future__ import annotations

import pytest

from portalbd.control import protocol
from portalbd.control import requests as rq


@pytest.mark.parametrize(
    "request_",
    [
        rq.Status(),
        rq.Metrics(),
        rq.SnapshotList(),
        rq.SnapshotCreate(name="s1"),
        rq.SnapshotGet(name="s1"),
        rq.SnapshotDelete(name="s1"),
        rq.SnapshotRestore(name="s1", force=True),
        rq.TraceStart(path="t.jsonl", workload="mkfs"),
        rq.TraceStop(),
        rq.Log(lines=5, after=41),
    ],
)
def test_every_request_reads_back_from_its_document(request_: rq.AnyRequest) -> None:
    line = protocol.encode_document(request_.document())
    assert protocol.parse_request(line) == request_
    assert request_.kind == type(request_).__name__


def test_the_documents_keep_the_wire_shape() -> None:
    assert rq.Status().document() == "Status"
    assert rq.SnapshotRestore(name="s").document() == {
        "SnapshotRestore": {"name": "s", "force": False}
    }
    assert list(rq.KINDS) == [
        "Status",
        "Metrics",
        "SnapshotList",
        "SnapshotCreate",
        "SnapshotGet",
        "SnapshotDelete",
        "SnapshotRestore",
        "TraceStart",
        "TraceStop",
        "Log",
    ]


def test_optional_fields_take_their_defaults() -> None:
    assert protocol.parse_request(b'{"TraceStart": {"path": "t"}}') == rq.TraceStart(
        path="t", workload="unnamed"
    )
    assert protocol.parse_request(b'{"SnapshotRestore": {"name": "s"}}') == rq.SnapshotRestore(
        name="s", force=False
    )
    assert protocol.parse_request(b'"Log"') == rq.Log(lines=100, after=-1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # several faults: unknown fields first, then missing ones, then types in field order
        (
            b'{"SnapshotRestore": {"force": 1, "bogus": 2}}',
            "SnapshotRestore: unknown field 'bogus'",
        ),
        (b'{"SnapshotRestore": {"force": 1}}', "SnapshotRestore: missing field 'name'"),
        (
            b'{"SnapshotRestore": {"force": 1, "name": 2}}',
            "SnapshotRestore: field 'name' must be a str",
        ),
        (
            b'{"TraceStart": {"path": "t", "workload": null}}',
            "TraceStart: field 'workload' must be a str",
        ),
        (b'{"Status": {"verbose": true}}', "Status: unknown field 'verbose'"),
    ],
)
def test_a_faulty_request_is_answered_about_its_first_fault(line: bytes, message: str) -> None:
    with pytest.raises(protocol.BadRequest) as caught:
        protocol.parse_request(line)
    assert str(caught.value) == message
