"""`portalbd-trace bench`: replay traces against daemons in several configurations.

Every combination of the swept knobs gets its own fresh daemon (so one
configuration's cache or LSM state never helps the next); on it the trace is
replayed `warmup` times unmeasured, then `iterations` times measured.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from portalbd.launch import LaunchError, MotoServer
from portalbd.trace import daemon_proc, format, results
from portalbd.trace.daemon_proc import DaemonConfig
from portalbd.trace.replay import ReplayOptions, ReplayResult, replay

STORE_KEYS = ("gets", "puts", "deletes", "batches", "flushes", "bytes_put", "bytes_got")


@dataclass(slots=True, kw_only=True)
class Sweep:
    storage: list[str] = field(default_factory=lambda: ["memory"])
    block_size: list[int | None] = field(default_factory=lambda: [None])
    flush_interval_ms: list[int | None] = field(default_factory=lambda: [None])
    l0_sst_size: list[int | None] = field(default_factory=lambda: [None])
    max_unflushed_bytes: list[int | None] = field(default_factory=lambda: [None])
    compression: list[str | None] = field(default_factory=lambda: [None])

    def configs(self) -> list[DaemonConfig]:
        return [
            DaemonConfig(
                storage=s,
                block_size=b,
                flush_interval_ms=f,
                l0_sst_size=l0,
                max_unflushed_bytes=mu,
                compression=c,
            )
            for s, b, f, l0, mu, c in itertools.product(
                self.storage,
                self.block_size,
                self.flush_interval_ms,
                self.l0_sst_size,
                self.max_unflushed_bytes,
                self.compression,
            )
        ]


@dataclass(slots=True, kw_only=True)
class BenchOptions:
    iterations: int = 3
    warmup: int = 1
    uri: str | None = None  # bench an already running server instead of starting portalbd
    profile_dir: Path | None = None
    workdir: Path | None = None
    speed: float | None = None
    connections: int | None = None  # as ReplayOptions.connections


def device_size_for(header: format.TraceHeader, ops: Sequence[format.TraceOp]) -> int:
    """Big enough for every request, rounded up to 1 MiB."""
    end = max((op.offset + op.length for op in ops), default=0)
    size = max(header.device_size_bytes, end, 1 << 20)
    return (size + (1 << 20) - 1) & ~((1 << 20) - 1)


def store_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    out: dict[str, int] = {}
    for k, v in after.items():
        if isinstance(v, int | float) and isinstance(before.get(k, 0), int | float):
            out[k] = int(v - before.get(k, 0))
    return out


@contextlib.contextmanager
def _profiler(pid: int, out: Path) -> Iterator[None]:
    """py-spy sampling the daemon while the body runs; SIGINT makes it write the SVG."""
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid),
           "--output", str(out), "--format", "flamegraph", "--nonblocking",
           "--rate", "250"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGINT) or not out.exists():
            print(
                f"py-spy did not write {out}: {err.decode(errors='replace').strip()}",
                file=sys.stderr,
            )


class Bench:
    def __init__(
        self,
        traces: Sequence[Path],
        sweep: Sweep,
        options: BenchOptions,
        console: Console | None = None,
    ) -> None:
        self.traces = list(traces)
        self.configs = sweep.configs()
        self.opt = options
        self.console = console or wide_console()
        self.s3: MotoServer | None = None

    def run(self) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            if self.opt.uri is None and any(c.storage == "s3" for c in self.configs):
                self.s3 = stack.enter_context(daemon_proc.s3_server())
            workroot = self.opt.workdir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="portalbd-bench-"))
            )
            loaded = [(p, *format.load(p)) for p in self.traces]
            configs: list[DaemonConfig | None] = (
                list(self.configs) if self.opt.uri is None else [None]
            )
            reps = self.opt.warmup + self.opt.iterations
            total = sum(len(ops) for _, _, ops in loaded) * reps * len(configs)
            progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            with progress:
                task = progress.add_task("bench", total=total)
                done_before = 0
                for n, (path, header, ops) in enumerate(loaded):
                    for k, cfg in enumerate(configs):
                        label = cfg.label() if cfg is not None else f"uri {self.opt.uri}"
                        progress.update(task, description=escape(f"{path.name} [{label}]"))
                        base = done_before

                        def report(done: int, _n: int, base: int = base) -> None:
                            progress.update(task, completed=base + done)

                        run = self._one(path, header, ops, cfg, workroot / f"{n}-{k}", report)
                        runs.append(run)
                        done_before += len(ops) * reps
                        progress.update(task, completed=done_before)
                        self.console.print(render_run(run))
        return {
            "schema": results.SCHEMA_ID,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": {
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "runs": runs,
        }

    def _one(
        self,
        path: Path,
        header: format.TraceHeader,
        ops: list[format.TraceOp],
        cfg: DaemonConfig | None,
        workdir: Path,
        report: Callable[[int, int], None],
    ) -> dict[str, Any]:
        reps = self.opt.warmup + self.opt.iterations
        opts = ReplayOptions(speed=self.opt.speed, connections=self.opt.connections)
        measured: list[ReplayResult] = []
        store: dict[str, int] | None = None
        n = len(ops)

        def replay_all(uri: str, before: Callable[[], None] | None) -> None:
            for i in range(reps):
                if i == self.opt.warmup and before is not None:
                    before()

                def prog(done: int, _total: int, i: int = i) -> None:
                    report(i * n + done, reps * n)

                r = replay(uri, ops, opts, prog)
                if i >= self.opt.warmup:
                    measured.append(r)

        if cfg is None:
            assert self.opt.uri is not None
            replay_all(self.opt.uri, None)
        else:
            d = daemon_proc.start(cfg, workdir, device_size_for(header, ops), s3=self.s3)
            try:
                marks: dict[str, dict[str, Any] | None] = {}

                def mark() -> None:
                    marks["before"] = daemon_proc.store_stats(d)

                with contextlib.ExitStack() as stack:
                    if self.opt.profile_dir is not None:
                        self.opt.profile_dir.mkdir(parents=True, exist_ok=True)
                        svg = self.opt.profile_dir / f"{path.stem}-{_slug(cfg.label())}.svg"
                        stack.enter_context(_profiler(d.process.pid, svg))
                    replay_all(d.uri, mark)
                store = store_delta(marks.get("before"), daemon_proc.store_stats(d))
                if d.process.poll() is not None:
                    raise LaunchError(f"portalbd exited during the replay\n{d.log_tail()}")
            finally:
                d.stop()
        summary = results.summarize(measured)
        return {
            "trace": str(path),
            "workload": header.workload,
            "label": cfg.label() if cfg is not None else f"uri {self.opt.uri}",
            "config": cfg.to_json() if cfg is not None else {"uri": self.opt.uri},
            "iterations": self.opt.iterations,
            "warmup": self.opt.warmup,
            "store": store,
            **summary,
        }


def wide_console() -> Console:
    """stderr console; 140 columns when not a terminal, so tables are not cut."""
    c = Console(stderr=True)
    if not c.is_terminal:
        c = Console(stderr=True, width=140)
    return c


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in text)


def render_run(run: dict[str, Any]) -> Table:
    title = f"{Path(run['trace']).name}  [{run['label']}]  {run['elapsed_s']:.2f}s"
    t = Table(title=escape(title))
    for col in ("op", "ops", "ops/s", "MiB/s", "p50 us", "p90", "p99", "p99.9", "max", "err"):
        t.add_column(col, justify="right")
    rows = [*run["by_type"].items(), ("total", run["total"])]
    for name, f in rows:
        lat = f["latency_us"]
        t.add_row(
            name, str(f["ops"]), f"{f['ops_per_s']:.0f}", f"{f['mib_per_s']:.1f}",
            *(f"{lat[k]:.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")), str(f["errors"]),
        )  # fmt: skip
    store = run.get("store")
    if store:
        t.caption = "object store: " + ", ".join(
            f"{k}={store[k]}" for k in STORE_KEYS if k in store
        )
    if run.get("skipped"):
        t.caption = (t.caption or "") + f"  skipped: {run['skipped']}"
    return t


def compare(old: dict[str, Any], new: dict[str, Any]) -> Table:
    """Before/after per (trace, configuration) present in both documents."""
    t = Table(title="bench comparison (new vs old)")
    for col in (
        "trace",
        "config",
        "op",
        "ops/s old",
        "ops/s new",
        "change",
        "p99 old",
        "p99 new",
        "change",
    ):
        t.add_column(
            col, justify="right" if "old" in col or "new" in col or col == "change" else "left"
        )

    def key(r: dict[str, Any]) -> tuple[str, str]:
        return Path(r["trace"]).name, r["label"]

    olds = {key(r): r for r in old["runs"]}
    for r in new["runs"]:
        o = olds.get(key(r))
        if o is None:
            continue
        for op in [*r["by_type"], "total"]:
            nf = r["total"] if op == "total" else r["by_type"][op]
            of = o["total"] if op == "total" else o["by_type"].get(op)
            if of is None:
                continue
            t.add_row(
                key(r)[0], key(r)[1], op,
                f"{of['ops_per_s']:.0f}", f"{nf['ops_per_s']:.0f}",
                _pct(of["ops_per_s"], nf["ops_per_s"]),
                f"{of['latency_us']['p99']:.0f}", f"{nf['latency_us']['p99']:.0f}",
                _pct(of["latency_us"]["p99"], nf["latency_us"]["p99"]),
            )  # fmt: skip
    return t


def _pct(old: float, new: float) -> str:
    if old == 0:
        return "n/a"
    return f"{(new - old) / old * 100:+.1f}%"
