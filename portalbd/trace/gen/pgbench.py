"""pgbench workload: PostgreSQL with its data directory on the device.

`initdb`, `pgbench -i -s 10`, then `pgbench -c 4 -T 60` (`--quick`: scale 1,
2 clients, 10 s).  PostgreSQL refuses to run as root, so its commands run as
the `postgres` user (Debian's packages create it); the server listens on a
Unix socket in the scratch directory only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from portalbd.launch import free_port
from portalbd.trace.gen.common import GIB, GenContext, GenError, log, mounted, run

DEFAULT_SIZE = 1 * GIB


def pg_bindir() -> Path:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if not dirs:
        raise GenError("PostgreSQL is not installed (Debian package postgresql)")
    return Path(dirs[-1])


def workload(ctx: GenContext) -> None:
    bindir = pg_bindir()
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise GenError("no 'postgres' user (install the Debian package postgresql)") from None
    as_pg = ["runuser", "-u", "postgres", "--"]
    # The postgres user must reach its directories, and the scratch directory
    # may sit below one only root can enter (pytest's tmp_path): use a fresh
    # world-traversable one in the system temp dir.
    public = Path(tempfile.mkdtemp(prefix="portalbd-pgbench-"))
    try:
        os.chmod(public, 0o755)
        _run_postgres(ctx, bindir, pw, as_pg, public)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _run_postgres(
    ctx: GenContext, bindir: Path, pw: pwd.struct_passwd, as_pg: list[str], public: Path
) -> None:
    scale, clients, seconds = (1, 2, 10) if ctx.quick else (10, 4, 60)
    rundir = public / "run"
    rundir.mkdir()
    os.chown(rundir, pw.pw_uid, pw.pw_gid)
    port = str(free_port())
    run(["mkfs.ext4", "-F", "-q", str(ctx.device)])
    with mounted(ctx.device, public / "mnt") as mnt:
        data = mnt / "pgdata"
        data.mkdir()
        os.chown(data, pw.pw_uid, pw.pw_gid)
        log("initdb")
        run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
        opts = f"-k {rundir} -p {port} -c listen_addresses=''"
        try:
            run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                 str(rundir / "postgres.log"), "-w", "-t", "120", "start"])  # fmt: skip
            pgbench = str(bindir / "pgbench") if (bindir / "pgbench").exists() else "pgbench"
            conn = ["-h", str(rundir), "-p", port, "-U", "postgres"]
            log(f"pgbench -i -s {scale}")
            run([*as_pg, pgbench, "-i", "-s", str(scale), *conn, "postgres"], timeout=900)
            log(f"pgbench -c {clients} -T {seconds}")
            out = run(
                [*as_pg, pgbench, "-c", str(clients), "-j", str(clients), "-T", str(seconds),
                 *conn, "postgres"],
                timeout=seconds + 300,
            )  # fmt: skip
            tps = [line for line in out.splitlines() if line.startswith("tps")]
            log(tps[0] if tps else "pgbench printed no tps line")
        finally:
            run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False)  # fmt: skip
