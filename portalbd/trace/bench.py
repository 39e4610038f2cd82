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

from portalbd import __version__
from portalbd.launch import LaunchError, MotoServer
from portalbd.trace import daemon_proc, format, provenance, results
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
    # another checkout whose daemon is measured too, alternating with this one's
    baseline: Path | None = None
    rounds: int = 1  # fresh daemons per (trace, configuration, side), each warm-up + iterations


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


@dataclass(frozen=True, slots=True)
class Side:
    """Whose daemon a run measures: this checkout's, or `--baseline DIR`'s."""

    name: str  # "current" or "baseline"
    tree: Path
    commit: str | None = None  # taken when the bench starts: the code that runs

    @property
    def env(self) -> dict[str, str]:
        return provenance.tree_env(self.tree) if self.name == "baseline" else {}

    def label(self, cfg_label: str) -> str:
        return f"{cfg_label} (baseline)" if self.name == "baseline" else cfg_label


@dataclass(slots=True)
class _Pass:
    """One (trace, configuration, side) accumulated over its rounds."""

    measured: list[ReplayResult] = field(default_factory=list)
    store: dict[str, int] | None = None
    version: str | None = None
    settings: dict[str, Any] | None = None


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
        self.sides = [Side("current", provenance.HERE, provenance.commit(provenance.HERE))]
        if options.baseline is not None:
            tree = provenance.check_baseline(options.baseline)
            self.sides.insert(0, Side("baseline", tree, provenance.commit(tree)))

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
            sides = self.sides if self.opt.uri is None else self.sides[-1:]
            rounds = self.opt.rounds if self.opt.uri is None else 1
            reps = (self.opt.warmup + self.opt.iterations) * rounds * len(sides)
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
                done = 0
                for n, (path, header, ops) in enumerate(loaded):
                    for k, cfg in enumerate(configs):
                        passes = {side.name: _Pass() for side in sides}
                        for rnd in range(rounds):
                            # ABBA: the side that went first goes second next round, so
                            # a machine getting busier or quieter favours neither
                            for side in sides if rnd % 2 == 0 else sides[::-1]:
                                label = (
                                    side.label(cfg.label())
                                    if cfg is not None
                                    else f"uri {self.opt.uri}"
                                )
                                progress.update(task, description=escape(f"{path.name} [{label}]"))

                                def report(d: int, _n: int, base: int = done) -> None:
                                    progress.update(task, completed=base + d)

                                workdir = workroot / (
                                    f"{n}-{k}"
                                    if len(sides) == 1 and rounds == 1
                                    else f"{n}-{k}-{side.name}-{rnd + 1}"
                                )
                                self._pass(
                                    passes[side.name], path, rnd, header, ops, cfg, side,
                                    workdir, report,
                                )  # fmt: skip
                                done += len(ops) * (self.opt.warmup + self.opt.iterations)
                                progress.update(task, completed=done)
                        for side in sides:
                            run = self._run_doc(path, header, cfg, side, passes[side.name], rounds)
                            runs.append(run)
                            self.console.print(render_run(run))
        doc: dict[str, Any] = {
            "schema": results.SCHEMA_ID,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": {
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "portalbd": {"version": __version__, "commit": self.sides[-1].commit},
            "runs": runs,
        }
        if self.opt.baseline is not None and self.opt.uri is None:
            base = self.sides[0]
            doc["baseline"] = {"tree": str(base.tree), "commit": base.commit}
        return doc

    def _pass(
        self,
        acc: _Pass,
        path: Path,
        rnd: int,
        header: format.TraceHeader,
        ops: list[format.TraceOp],
        cfg: DaemonConfig | None,
        side: Side,
        workdir: Path,
        report: Callable[[int, int], None],
    ) -> None:
        """One fresh daemon (or the --uri server): warm-up, then measured iterations."""
        reps = self.opt.warmup + self.opt.iterations
        opts = ReplayOptions(speed=self.opt.speed, connections=self.opt.connections)
        n = len(ops)

        def replay_all(uri: str, before: Callable[[], None] | None) -> None:
            for i in range(reps):
                if i == self.opt.warmup and before is not None:
                    before()

                def prog(done: int, _total: int, i: int = i) -> None:
                    report(i * n + done, reps * n)

                r = replay(uri, ops, opts, prog)
                if i >= self.opt.warmup:
                    acc.measured.append(r)

        if cfg is None:
            assert self.opt.uri is not None
            replay_all(self.opt.uri, None)
            return
        size = device_size_for(header, ops)
        d = daemon_proc.start(cfg, workdir, size, s3=self.s3, env=side.env)
        try:
            if acc.version is None:
                acc.version = daemon_proc.version(d)
                env = daemon_proc.daemon_env(workdir, self.s3, side.env)
                acc.settings = daemon_proc.settings(d, env)
            marks: dict[str, dict[str, Any] | None] = {}

            def mark() -> None:
                marks["before"] = daemon_proc.store_stats(d)

            with contextlib.ExitStack() as stack:
                if self.opt.profile_dir is not None:
                    self.opt.profile_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{path.stem}-{_slug(side.label(cfg.label()))}"
                    if self.opt.rounds > 1:
                        name += f"-round{rnd + 1}"
                    svg = self.opt.profile_dir / f"{name}.svg"
                    stack.enter_context(_profiler(d.process.pid, svg))
                replay_all(d.uri, mark)
            delta = store_delta(marks.get("before"), daemon_proc.store_stats(d))
            acc.store = _add_counts(acc.store, delta)
            if d.process.poll() is not None:
                raise LaunchError(f"portalbd exited during the replay\n{d.log_tail()}")
        finally:
            d.stop()

    def _run_doc(
        self,
        path: Path,
        header: format.TraceHeader,
        cfg: DaemonConfig | None,
        side: Side,
        acc: _Pass,
        rounds: int,
    ) -> dict[str, Any]:
        summary = results.summarize(acc.measured)
        run: dict[str, Any] = {
            "trace": str(path),
            "workload": header.workload,
            "label": side.label(cfg.label()) if cfg is not None else f"uri {self.opt.uri}",
            "config": cfg.to_json() if cfg is not None else {"uri": self.opt.uri},
            "iterations": self.opt.iterations * rounds,
            "warmup": self.opt.warmup,
            "store": acc.store,
            # per measured iteration, for medians (a noisy machine's mean misleads)
            "iteration_s": [round(r.elapsed_ns / 1e9, 4) for r in acc.measured],
            **summary,
        }
        if cfg is not None:
            run["daemon"] = {
                "side": side.name,
                "tree": str(side.tree),
                "version": acc.version,
                "commit": side.commit,
                "settings": acc.settings,
            }
        if rounds > 1:
            run["rounds"] = rounds
        return run


def _add_counts(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


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


def baseline_table(doc: dict[str, Any]) -> Table:
    """--baseline's before/after: median time and ops/s per trace and configuration."""
    t = Table(title="baseline vs current (medians of the measured iterations)")
    for col in ("trace", "config", "ops", "baseline s", "ops/s", "current s", "ops/s", "speedup"):
        t.add_column(col, justify="left" if col in ("trace", "config") else "right")
    for row in results.baseline_pairs(doc):
        b, c = row["baseline"], row["current"]
        t.add_row(
            Path(row["trace"]).name, row["config"], str(row["ops"]),
            f"{b['median_s']:.3f}", f"{b['ops_per_s']:.0f}",
            f"{c['median_s']:.3f}", f"{c['ops_per_s']:.0f}",
            "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x",
        )  # fmt: skip
    t.caption = f"{doc.get('baseline', {}).get('tree', '?')} vs this checkout"
    return t
