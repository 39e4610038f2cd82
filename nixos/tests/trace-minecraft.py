UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"

start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)

with subtest("the world lives on the portalbd disk"):
    machine.succeed(
        f"mkfs.ext4 -q -F {DEVICE}",
        "mkdir -p /mnt/disk",
        f"mount {DEVICE} /mnt/disk",
        f"install -d -o minecraft -g minecraft {WORLD_DIR}",
    )

with subtest("world generation and save are recorded"):
    control(INSTANCE, {"TraceStart": {"path": TRACE, "workload": "minecraft"}})
    machine.succeed("systemctl start minecraft-server.service")
    machine.wait_until_succeeds(
        "journalctl -u minecraft-server.service | grep -q 'Done ('", timeout=900
    )
    # Stopping the server saves the world (region files, level.dat).
    machine.succeed("systemctl stop minecraft-server.service", "sync -f /mnt/disk")
    control(INSTANCE, "TraceStop")
    machine.succeed(f"test -s {WORLD_DIR}/world/level.dat")
    machine.succeed(f"ls {WORLD_DIR}/world/region/*.mca")
    info: dict[str, Any] = json.loads(machine.succeed(f"portalbd-trace info --json {TRACE}"))
    assert info["workload"] == "minecraft", info
    assert info["complete"] and info["errors"] == 0, info
    assert info["counts"].get("Write", 0) > 0, info
    machine.copy_from_vm(TRACE)

machine.succeed("umount /mnt/disk")
