UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"
STREAM_FILES = [f"{MOUNT}/stream{i}" for i in range(STREAMS)]


def available_bytes() -> int:
    return int(machine.succeed(f"df --output=avail -B1 {MOUNT} | tail -1"))


def still_serving() -> None:
    """The daemon took the pressure without failing: active, attached, answering."""
    machine.require_unit_state(UNIT, "active")
    machine.require_unit_state(ATTACH, "active")
    assert status(INSTANCE)["size_bytes"] == DISK_BYTES


start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)
# No blocks reserved for root: the fill runs into the real end of the disk.
machine.succeed(f"mkfs.ext4 -q -F -m 0 {DEVICE}", f"mkdir -p {MOUNT}", f"mount {DEVICE} {MOUNT}")

with subtest("filling the filesystem ends in ENOSPC for the writer only"):
    code, out = machine.execute(
        f"dd if=/dev/urandom of={MOUNT}/fill bs=1M conv=fsync status=none 2>&1", timeout=1800
    )
    assert code != 0, "dd wrote more than the disk holds"
    assert "No space left on device" in out, out
    assert available_bytes() < 1024 * 1024, machine.succeed(f"df -B1 {MOUNT}")
    # A small write into the full filesystem is refused the same way.
    code, out = machine.execute(f"(echo more > {MOUNT}/more) 2>&1")
    assert code != 0 and "No space left on device" in out, out
    still_serving()

with subtest("the full filesystem is consistent"):
    machine.succeed("sync", f"umount {MOUNT}", f"e2fsck -f -n {DEVICE}")

with subtest("freed space can be written again"):
    machine.succeed(f"mount {DEVICE} {MOUNT}", f"rm {MOUNT}/fill", "sync")
    # The blocks go back to the daemon too (TRIM), not only to ext4.
    machine.succeed(f"fstrim -v {MOUNT}")
    assert available_bytes() > DISK_BYTES * 8 // 10, machine.succeed(f"df -B1 {MOUNT}")
    machine.succeed(f"dd if=/dev/urandom of={MOUNT}/again bs=1M count=64 conv=fsync status=none")
    machine.succeed(f"rm {MOUNT}/again")

with subtest("parallel writers all land, and survive a restart"):
    sources = [f"/root/stream{i}" for i in range(STREAMS)]
    for source in sources:
        machine.succeed(f"dd if=/dev/urandom of={source} bs=1M count={STREAM_MIB} status=none")
    wanted = [file_sha256(source) for source in sources]
    # One shell: start every writer, then wait for each, so a failed one fails
    # the command.
    starts = "; ".join(
        f'dd if={src} of={dst} bs=1M conv=fsync status=none & pids="$pids $!"'
        for src, dst in zip(sources, STREAM_FILES, strict=True)
    )
    machine.succeed(f'pids=""; {starts}; for p in $pids; do wait "$p"; done', timeout=900)
    assert [file_sha256(f) for f in STREAM_FILES] == wanted
    still_serving()
    machine.succeed(f"umount {MOUNT}")
    machine.succeed(f"systemctl restart {UNIT}")
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)
    machine.succeed(f"e2fsck -f -n {DEVICE}", f"mount {DEVICE} {MOUNT}")
    assert [file_sha256(f) for f in STREAM_FILES] == wanted
    machine.succeed(f"umount {MOUNT}")
