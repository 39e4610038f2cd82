UNIT = f"portalbd-{INSTANCE}.service"
ATTACH = f"portalbd-{INSTANCE}-attach.service"
AS_PG = "runuser -u postgres --"
PG = f"-h {PGDATA}"

start_all()
machine.wait_for_unit(UNIT)
wait_attached(ATTACH, DEVICE)

with subtest("PostgreSQL runs on the portalbd disk"):
    machine.succeed(
        f"mkfs.ext4 -q -F {DEVICE}",
        "mkdir -p /mnt/disk",
        f"mount {DEVICE} /mnt/disk",
        f"install -d -o postgres -g postgres -m 700 {PGDATA}",
        f"{AS_PG} initdb -D {PGDATA} -A trust -U postgres",
        f"echo \"unix_socket_directories = '{PGDATA}'\" >> {PGDATA}/postgresql.conf",
        f"echo \"listen_addresses = ''\" >> {PGDATA}/postgresql.conf",
        f"{AS_PG} pg_ctl -D {PGDATA} -l {PGDATA}/server.log -w start",
    )
    machine.wait_until_succeeds(f"{AS_PG} psql {PG} -c 'SELECT 1'")

with subtest("pgbench is recorded"):
    control(INSTANCE, {"TraceStart": {"path": TRACE, "workload": "pgbench"}})
    machine.succeed(
        f"{AS_PG} createdb {PG} bench",
        f"{AS_PG} pgbench {PG} -i -s {SCALE} bench",
        f"{AS_PG} pgbench {PG} -c 4 -j 2 -T {SECONDS} bench",
        f"{AS_PG} psql {PG} -c CHECKPOINT",
        timeout=1800,
    )
    control(INSTANCE, "TraceStop")
    info: dict[str, Any] = json.loads(machine.succeed(f"portalbd-trace info --json {TRACE}"))
    assert info["workload"] == "pgbench", info
    assert info["complete"] and info["errors"] == 0, info
    assert info["counts"].get("Write", 0) > 0 and info["counts"].get("Flush", 0) > 0, info
    machine.copy_from_vm(TRACE)

with subtest("the database is intact after a restart of portalbd"):
    before = machine.succeed(
        f"{AS_PG} psql {PG} -tA -c 'SELECT count(*) FROM pgbench_history' bench"
    )
    machine.succeed(f"{AS_PG} pg_ctl -D {PGDATA} -m fast -w stop", "umount /mnt/disk")
    machine.succeed(f"systemctl restart {UNIT}")
    machine.wait_for_unit(UNIT)
    wait_attached(ATTACH, DEVICE)
    machine.succeed(
        f"mount {DEVICE} /mnt/disk",
        f"{AS_PG} pg_ctl -D {PGDATA} -l {PGDATA}/server.log -w start",
    )
    after = machine.succeed(
        f"{AS_PG} psql {PG} -tA -c 'SELECT count(*) FROM pgbench_history' bench"
    )
    assert before == after, (before, after)
    machine.succeed(f"{AS_PG} pg_ctl -D {PGDATA} -m fast -w stop", "umount /mnt/disk")
