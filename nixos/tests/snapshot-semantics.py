UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"
CTL = f"portalctl --instance {INSTANCE}"


def mount() -> None:
    machine.succeed(f"systemctl start {ATTACH}")
    wait_attached(ATTACH, DEVICE)
    machine.succeed(f"mount {DEVICE} /mnt/disk")


def unmount() -> None:
    """Unmount and detach, so a snapshot or restore sees a quiet disk."""
    machine.succeed("umount /mnt/disk", f"systemctl stop {ATTACH}")
    wait_detached(DEVICE)


def write_generation(n: int) -> str:
    machine.succeed(
        f"echo generation-{n} > /mnt/disk/gen.txt",
        f"dd if=/dev/urandom of=/mnt/disk/gen{n}.dat bs=1M count=4 status=none",
    )
    return file_sha256(f"/mnt/disk/gen{n}.dat")


def check_generation(n: int, sha: str, absent: list[int]) -> None:
    assert machine.succeed("cat /mnt/disk/gen.txt").strip() == f"generation-{n}"
    assert file_sha256(f"/mnt/disk/gen{n}.dat") == sha
    for other in absent:
        machine.fail(f"test -e /mnt/disk/gen{other}.dat")


start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)
machine.succeed(f"mkfs.ext4 -q -F {DEVICE}", "mkdir -p /mnt/disk", f"mount {DEVICE} /mnt/disk")

with subtest("snapshots are taken and listed in order"):
    gen1 = write_generation(1)
    unmount()
    machine.succeed(f"{CTL} snapshot create snap1")
    mount()
    gen2 = write_generation(2)
    unmount()
    machine.succeed(f"{CTL} snapshot create snap2")
    assert snapshot_names(INSTANCE) == ["snap1", "snap2"]
    listed = machine.succeed(f"{CTL} snapshot list")
    assert "snap1" in listed and "snap2" in listed, listed
    machine.succeed(f"{CTL} snapshot get snap1")

with subtest("mistakes are refused"):
    machine.fail(f"{CTL} snapshot create snap1")  # the name is taken
    machine.fail(f"{CTL} snapshot get nosuch")
    machine.fail(f"{CTL} snapshot restore nosuch")
    machine.fail(f"{CTL} snapshot delete nosuch")
    assert snapshot_names(INSTANCE) == ["snap1", "snap2"]

with subtest("restoring the older snapshot brings its data back"):
    machine.succeed(f"{CTL} snapshot restore snap1")
    mount()
    check_generation(1, gen1, absent=[2])
    gen3 = write_generation(3)
    unmount()
    machine.succeed(f"{CTL} snapshot create snap3")

with subtest("a restore keeps every snapshot, newer ones included"):
    assert snapshot_names(INSTANCE) == ["snap1", "snap2", "snap3"]
    machine.succeed(f"{CTL} snapshot restore snap2")
    mount()
    check_generation(2, gen2, absent=[3])
    unmount()

with subtest("deleting a snapshot leaves the others usable"):
    machine.succeed(f"{CTL} snapshot delete snap1")
    machine.fail(f"{CTL} snapshot get snap1")
    machine.fail(f"{CTL} snapshot restore snap1")
    machine.succeed(f"{CTL} snapshot restore snap3")
    mount()
    check_generation(3, gen3, absent=[2])
    unmount()

with subtest("the catalog survives a restart of the daemon"):
    machine.succeed(f"systemctl restart {UNIT}")
    machine.wait_for_unit(UNIT)
    assert snapshot_names(INSTANCE) == ["snap2", "snap3"]
    mount()
    check_generation(3, gen3, absent=[2])
    unmount()
