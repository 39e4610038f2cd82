UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"

start_all()

with subtest("the service is active only once the daemon listens"):
    machine.wait_for_unit(UNIT)
    # Type=notify: "active" means READY=1 arrived, which the daemon sends
    # after its listeners are bound, so no waiting for the port here.
    machine.succeed(f"nc -z 127.0.0.1 {NBD_PORT}")
    machine.succeed(f"test -S /run/portalbd/{INSTANCE}/control.sock")
    wait_attached(ATTACH, DEVICE)
    size = int(machine.succeed(f"blockdev --getsize64 {DEVICE}"))
    assert size == DISK_SIZE_GB * 2**30, f"{DEVICE} has {size} bytes"
    assert status(INSTANCE)["size_bytes"] == size

with subtest("the daemon runs unprivileged and confined"):
    info = machine.get_unit_info(UNIT)
    assert info["Type"] == "notify", info["Type"]
    assert info["DynamicUser"] == "yes"
    assert info["NoNewPrivileges"] == "yes"
    assert info["ProtectSystem"] == "strict"
    assert info["CapabilityBoundingSet"] == "", info["CapabilityBoundingSet"]
    pid = info["MainPID"]
    machine.succeed(f"test $(stat -c %u /proc/{pid}) -ne 0")
    machine.succeed(f"grep -q '^CapEff:[[:space:]]*0*$' /proc/{pid}/status")
    # The storage lives in the instance's state directory.
    machine.succeed(f'test -n "$(ls -A {STORE_DIR})"')

with subtest("portalctl and the protocol agree on the instance"):
    machine.succeed(f"portalctl --instance {INSTANCE} status")
    st = status(INSTANCE)
    assert st["instance"] == INSTANCE, st
    assert st["nbd_address"] == f"127.0.0.1:{NBD_PORT}", st

with subtest("a clean stop keeps acknowledged writes"):
    # O_DIRECT writes without any flush from the client: only the daemon's
    # own flush on SIGTERM makes them durable.
    machine.succeed(
        "dd if=/dev/urandom of=/root/raw.bin bs=1M count=8 status=none",
        f"dd if=/root/raw.bin of={DEVICE} bs=1M seek=512 oflag=direct status=none",
    )
    written = file_sha256("/root/raw.bin")
    machine.succeed(f"systemctl stop {UNIT}")
    wait_detached(DEVICE)
    assert machine.get_unit_property(UNIT, "Result") == "success"
    machine.succeed(f"systemctl start {UNIT}")
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)
    assert device_sha256(DEVICE, 512, 8) == written

with subtest("a filesystem survives a restart of the service"):
    machine.succeed(
        f"mkfs.ext4 -q -F {DEVICE}",
        "mkdir -p /mnt/disk",
        f"mount {DEVICE} /mnt/disk",
        "echo 'hello from portalbd' > /mnt/disk/hello.txt",
        "dd if=/dev/urandom of=/mnt/disk/random.dat bs=1M count=16 status=none",
    )
    before = file_sha256("/mnt/disk/random.dat")
    machine.succeed("umount /mnt/disk")
    # The attach unit is part of the daemon's unit: it detaches first and
    # attaches again once the new daemon is ready.
    machine.succeed(f"systemctl restart {UNIT}")
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)
    machine.succeed(f"e2fsck -f -n {DEVICE}", f"mount {DEVICE} /mnt/disk")
    assert machine.succeed("cat /mnt/disk/hello.txt").strip() == "hello from portalbd"
    assert file_sha256("/mnt/disk/random.dat") == before
    machine.succeed("umount /mnt/disk")

with subtest("stopping the attach unit detaches the kernel device"):
    machine.succeed(f"systemctl stop {ATTACH}")
    wait_detached(DEVICE)
    machine.require_unit_state(UNIT, "active")
