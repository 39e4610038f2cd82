UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"
WORKDIR = f"{MOUNT}/work"

start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)
machine.succeed(
    f"mkfs.ext4 -q -F {DEVICE}", f"mkdir -p {MOUNT}", f"mount {DEVICE} {MOUNT}", f"mkdir {WORKDIR}"
)

with subtest("the suite sees an ext4"):
    fs = machine.succeed(f"cd {WORKDIR} && df -PT . | tail -1 | awk '{{print $2}}'").strip()
    assert fs == "ext4", fs

with subtest("pjdfstest passes on ext4 over portalbd"):
    # Run from inside the filesystem under test, as root; prove exits
    # non-zero when any test fails, and its summary says which.
    out = machine.succeed(f"cd {WORKDIR} && prove -r {SUITE}/tests 2>&1", timeout=3600)
    assert "Result: PASS" in out, out[-4000:]

with subtest("the filesystem is consistent after the suite"):
    machine.succeed(f"umount {MOUNT}", f"e2fsck -f -n {DEVICE}")
    machine.require_unit_state(UNIT, "active")
