UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"


def trace_info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(machine.succeed(f"portalbd-trace info --json {path}"))
    return info


start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)

with subtest("mkfs.ext4 through the kernel client is recorded"):
    machine.succeed(
        f"mkfs.ext4 -F {DEVICE}",
        "mkdir -p /mnt/disk",
        f"mount {DEVICE} /mnt/disk",
        "umount /mnt/disk",
    )
    # Stopping the service detaches the device, then the daemon closes the
    # trace with its footer.
    machine.succeed(f"systemctl stop {UNIT}")
    wait_detached(DEVICE)
    info = trace_info(TRACE)
    assert info["workload"] == "mkfs", info
    assert info["complete"], info
    assert info["errors"] == 0, info
    assert info["counts"].get("Write", 0) > 0, info
    assert info["device_size_bytes"] == 2**30, info
    machine.copy_from_vm(TRACE)

with subtest("the mkfs generator runs on NixOS too"):
    machine.succeed(f"mkdir -p $(dirname {GENERATED})")
    machine.succeed(f"portalbd-trace gen mkfs --quick --out {GENERATED}", timeout=900)
    info = trace_info(GENERATED)
    assert info["workload"] == "mkfs", info
    assert info["complete"] and info["ops"] > 0, info
    machine.copy_from_vm(GENERATED)
