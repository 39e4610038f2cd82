# Helpers shared by the portalbd VM tests; lib.nix puts this file between a
# test's constants and its script. They act on the driver's global `machine`
# (every portalbd test has a single node).
import json
import shlex
from typing import Any


def control(instance: str, request: object) -> Any:
    """Send one request on an instance's control socket and return the reply.

    Talks the documented wire protocol (docs/control-protocol.md) directly,
    so the tests do not depend on how portalctl formats its output.
    """
    path = f"/run/portalbd/{instance}/control.sock"
    line = shlex.quote(json.dumps(request))
    out = machine.succeed(f"printf '%s\\n' {line} | socat -t 5 - UNIX-CONNECT:{path}")
    reply = json.loads(out)
    if isinstance(reply, dict) and "Error" in reply:
        raise AssertionError(f"{instance}: {request!r} failed: {reply['Error']}")
    return reply


def status(instance: str) -> dict[str, Any]:
    reply: dict[str, Any] = control(instance, "Status")["Status"]
    return reply


def snapshot_names(instance: str) -> list[str]:
    return [s["name"] for s in control(instance, "SnapshotList")["SnapshotList"]]


def device_sha256(device: str, offset_mib: int, count_mib: int) -> str:
    """Checksum of a range of a block device, read past the page cache."""
    out = machine.succeed(
        f"dd if={device} bs=1M skip={offset_mib} count={count_mib} iflag=direct status=none"
        " | sha256sum"
    )
    return out.split()[0]


def wait_attached(unit: str, device: str) -> None:
    machine.wait_for_unit(unit)
    machine.wait_until_succeeds(f"test $(cat /sys/block/{device.removeprefix('/dev/')}/size) != 0")


def wait_detached(device: str) -> None:
    machine.wait_until_succeeds(f"test $(cat /sys/block/{device.removeprefix('/dev/')}/size) = 0")


def file_sha256(path: str) -> str:
    return machine.succeed(f"sha256sum {shlex.quote(path)}").split()[0]
