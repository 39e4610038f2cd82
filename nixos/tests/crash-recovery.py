UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"
BLOCKS = 64  # unflushed blocks written just before the crash


def block_sha256s(path: str, first_block: int, count: int) -> list[str]:
    """sha256 of each device-sized block of a file or device, in order."""
    out = machine.succeed(
        f"for i in $(seq {first_block} {first_block + count - 1}); do"
        f" dd if={path} bs={BLOCK_SIZE} skip=$i count=1 iflag=direct status=none | sha256sum;"
        " done"
    )
    return [line.split()[0] for line in out.splitlines()]


def crash() -> None:
    """SIGKILL the daemon and wait for systemd to bring it back."""
    restarts = int(machine.get_unit_property(UNIT, "NRestarts"))
    machine.succeed(f"systemctl kill --signal=KILL {UNIT}")
    machine.wait_until_succeeds(
        f"test $(systemctl show -P NRestarts {UNIT}) -gt {restarts}", timeout=120
    )
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)


start_all()

with subtest("MinIO holds the bucket"):
    machine.wait_for_unit("minio.service")
    machine.wait_for_open_port(MINIO_PORT)
    machine.wait_until_succeeds(
        f"mc alias set local http://127.0.0.1:{MINIO_PORT} {MINIO_USER} {MINIO_PASSWORD}"
    )
    machine.succeed(f"mc mb local/{BUCKET}")
    machine.succeed(f"systemctl start {UNIT}")
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)
    assert status(INSTANCE)["storage_url"] == f"s3://{BUCKET}/crash"

with subtest("flushed writes survive SIGKILL, unflushed ones are never torn"):
    # 16 MiB made durable by fsync (the kernel sends NBD_CMD_FLUSH).
    machine.succeed(
        "dd if=/dev/urandom of=/root/flushed.bin bs=1M count=16 status=none",
        f"dd if=/root/flushed.bin of={DEVICE} bs=1M oflag=direct conv=fsync status=none",
    )
    flushed = file_sha256("/root/flushed.bin")
    # Then blocks at 64 MiB with no flush at all before the crash.
    first = 64 * 2**20 // BLOCK_SIZE
    machine.succeed(
        f"dd if=/dev/urandom of=/root/unflushed.bin bs={BLOCK_SIZE} count={BLOCKS} status=none",
        f"dd if=/root/unflushed.bin of={DEVICE} bs={BLOCK_SIZE} seek={first}"
        " oflag=direct status=none",
    )
    new = block_sha256s("/root/unflushed.bin", 0, BLOCKS)
    zero = machine.succeed(f"head -c {BLOCK_SIZE} /dev/zero | sha256sum").split()[0]
    crash()
    assert device_sha256(DEVICE, 0, 16) == flushed, "a flushed write was lost"
    after = block_sha256s(DEVICE, first, BLOCKS)
    torn = [i for i, sha in enumerate(after) if sha not in (new[i], zero)]
    assert not torn, f"blocks {torn} are neither the old nor the new data"
    survived = sum(a == n for a, n in zip(after, new, strict=True))
    machine.log(f"{survived}/{BLOCKS} unflushed blocks survived the crash")

with subtest("a filesystem synced before the crash is intact after it"):
    machine.succeed(
        f"mkfs.ext4 -q -F {DEVICE}",
        "mkdir -p /mnt/disk",
        f"mount {DEVICE} /mnt/disk",
        "echo pre-crash > /mnt/disk/pre-crash.txt",
        "dd if=/dev/urandom of=/mnt/disk/data.bin bs=1M count=8 status=none",
        "sync -f /mnt/disk",
    )
    before = file_sha256("/mnt/disk/data.bin")
    machine.succeed("umount /mnt/disk")
    crash()
    machine.succeed(f"e2fsck -f -n {DEVICE}", f"mount {DEVICE} /mnt/disk")
    assert machine.succeed("cat /mnt/disk/pre-crash.txt").strip() == "pre-crash"
    assert file_sha256("/mnt/disk/data.bin") == before

with subtest("a crash in the middle of writes leaves a recoverable filesystem"):
    machine.succeed("echo synced > /mnt/disk/synced.txt", "sync -f /mnt/disk")
    machine.execute(
        "dd if=/dev/urandom of=/mnt/disk/busy.bin bs=1M count=64 status=none >/dev/null 2>&1 &"
    )
    machine.succeed("sleep 1", f"systemctl kill --signal=KILL {UNIT}")
    # The kernel device goes away with the daemon: stop the writer and drop
    # the dead mount so the device can be attached again.
    machine.execute("pkill -x dd; sleep 1; umount -l /mnt/disk")
    machine.wait_until_succeeds(f"systemctl is-active {UNIT}", timeout=120)
    wait_attached(ATTACH, DEVICE)
    # Journal replay may be needed; data synced before the crash must be there.
    machine.succeed(f"e2fsck -f -y {DEVICE} || test $? -le 2")
    machine.succeed(f"mount {DEVICE} /mnt/disk")
    assert machine.succeed("cat /mnt/disk/synced.txt").strip() == "synced"
    assert file_sha256("/mnt/disk/data.bin") == before
    machine.succeed("umount /mnt/disk")
