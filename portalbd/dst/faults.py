"""Object-store faults for the simulation: errors, latency, an outage, a full disk.

The slatedb binding takes no object store written in Python, so faults enter
one level up: :data:`portalbd.store.slate.OPEN_HOOK` builds every data
database through :class:`FaultPlan`, which wraps the binding's ``Db`` in a
:class:`FaultyDb`. The faults look like what the real binding does (observed
against moto behind a dead proxy and a full tmpfs):

* S3 failing: a call raises ``Error.Unavailable`` ("object store error"); once
  a WAL write or flush has failed, SlateDB closes the database (``status``
  says ``panic``) and every later call fails the same way until portalbd
  reopens it, which fails too while the store is down;
* a full local disk: writes land in the memtable (reads see them) but
  flushes never return, and under memtable pressure writes stall as well;
  SlateDB raises nothing, portalbd's ``[storage] timeout_ms`` turns the wait
  into an error. Reads keep working.

The catalog database is left alone: its failure modes need a model of
half-committed snapshots and restores of their own. What the plan injects
depends on the seed (kind, rates, windows); which call a per-call draw lands
on follows the order of calls, which the device's background writer makes
slightly timing-dependent, like everything SlateDB's threads do.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import slatedb.uniffi as sdb

from portalbd.store import slate

KINDS = ("none", "errors", "latency", "outage", "enospc")
CHOICES = ("none", "seed", *KINDS[1:])

# The simulation shortens the reopen spacing (2 s in the daemon) so an outage
# of a second sees several failed reopens and recovery takes milliseconds.
SIM_REOPEN_INTERVAL_S = 0.1
# ENOSPC makes flushes wait for the storage bound: short, but well above what
# an unfaulted call takes on a loaded machine (150 ms was not, under nice 19).
ENOSPC_TIMEOUT_MS = 500
FAULT_TIMEOUT_MS = 5000  # other kinds: generous, a slow shared CPU is no fault

S3_DOWN = (
    "Unavailable error: object store error (Generic S3 error: Error performing "
    "{method} in 0.5s, after 1 retries - HTTP error: error sending request) [injected]"
)


def kind_for(mode: str, seed: int) -> str:
    """The fault kind of a seed: ``seed`` spreads the kinds over the seeds."""
    if mode != "seed":
        return mode
    return random.Random(f"faults:{seed}").choice(KINDS)


@dataclass(slots=True)
class Window:
    """A stretch of the run in which every call fails (or flushes stall)."""

    start_step: int
    seconds: float
    opened_at: float | None = None
    closed: bool = False
    recovered: bool = False  # the simulation saw FLUSH succeed after it


class FaultPlan:
    """What goes wrong in one run, drawn from the seed; counts what it did."""

    def __init__(self, kind: str, seed: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; choose from {', '.join(CHOICES)}")
        self.kind = kind
        # Its own generator: per-call draws follow the order of calls, which
        # must not move the workload's operations (those are the seed's).
        self.rng = random.Random(f"{seed}:{kind}")
        self.counts: Counter[str] = Counter()
        self.enabled = kind != "none"
        self._paused = 0
        self.step = 0
        self.error_rate = self.rng.uniform(0.01, 0.06) if kind == "errors" else 0.0
        self.windows: list[Window] = []
        if kind in ("outage", "enospc"):
            # Fixed by the seed alone, not by the run's length: a replay that
            # stops right after a failing step must see the same windows.
            start = self.rng.randrange(5, 100)
            # A full disk lasts longer than the storage bound, or no stalled
            # flush would ever time out.
            shortest = 0.3 if kind == "outage" else 2 * ENOSPC_TIMEOUT_MS / 1000
            for _ in range(self.rng.randint(1, 2)):
                self.windows.append(Window(start, self.rng.uniform(shortest, 1.5)))
                start += self.rng.randrange(20, 150)

    # --- what the simulation asks -------------------------------------------------

    def errors_allowed(self) -> bool:
        """May a request fail now? Only while faults are, or were and have
        not been recovered from; between windows every request must succeed."""
        if not self.enabled:
            return False
        if self.kind == "errors":
            return True
        return any(w.opened_at is not None and not w.recovered for w in self.windows)

    def read_errors_allowed(self) -> bool:
        """A full disk still reads; S3 trouble does not."""
        return self.kind != "enospc" and self.errors_allowed()

    def recovered(self) -> None:
        for window in self.windows:
            if window.closed:
                window.recovered = True

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        parts = [f"{name}:{n}" for name, n in sorted(self.counts.items())]
        return ",".join(parts) or "-"

    def schedule(self) -> str:
        if self.kind == "errors":
            return f"errors rate={self.error_rate:.3f}"
        if self.windows:
            spans = ", ".join(f"step {w.start_step} for {w.seconds:.2f}s" for w in self.windows)
            return f"{self.kind} windows: {spans}"
        return self.kind

    def at_step(self, step: int) -> list[Window]:
        """Advance to ``step``; the windows that have just ended."""
        self.step = step
        now = time.monotonic()
        ended = []
        for window in self.windows:
            if window.closed:
                continue
            if window.opened_at is None and step >= window.start_step:
                window.opened_at = now
                self.counts["windows"] += 1
            if window.opened_at is not None and now - window.opened_at >= window.seconds:
                window.closed = True
                ended.append(window)
        return ended

    def stop(self) -> None:
        """The faults end for good (recovery is checked after this)."""
        self.enabled = False
        for window in self.windows:
            window.closed = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No faults inside: opening an instance is not what is under test."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _active(self) -> bool:
        return self.enabled and not self._paused

    def window_left(self) -> float:
        """Seconds until the open window ends (0 outside one)."""
        if not self._active():
            return 0.0
        now = time.monotonic()
        left = [
            w.opened_at + w.seconds - now
            for w in self.windows
            if w.opened_at is not None and not w.closed
        ]
        return max([0.0, *left])

    def in_window(self) -> bool:
        return self.window_left() > 0

    # --- the hook -----------------------------------------------------------------

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route every database open through this plan (and restore on exit)."""
        if not self.enabled:
            yield
            return
        saved_hook, saved_interval = slate.OPEN_HOOK[0], slate.REOPEN_INTERVAL_S
        slate.OPEN_HOOK[0] = self.open
        slate.REOPEN_INTERVAL_S = SIM_REOPEN_INTERVAL_S
        try:
            yield
        finally:
            slate.OPEN_HOOK[0] = saved_hook
            slate.REOPEN_INTERVAL_S = saved_interval

    async def open(self, builder: Any, path: str) -> Any:
        faulty = "/gen/" in f"/{path}"  # data generations, not the catalog
        if faulty and self._active() and self.kind == "outage" and self.in_window():
            self.counts["failed_opens"] += 1
            raise sdb.Error.Unavailable(S3_DOWN.format(method="GET manifest"))
        db = await builder.build()
        return FaultyDb(db, self) if faulty else db

    # --- per call -------------------------------------------------------------------

    async def before(self, what: str, db: FaultyDb) -> None:
        """Delay, stall or fail one call; returns when it may go ahead."""
        if not self._active():
            return
        rng = self.rng
        if self.kind == "latency":
            if rng.random() < 0.5:
                self.counts["delays"] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.015))
            return
        if self.kind == "enospc":
            if self.in_window() and (what == "flush" or (what == "write" and rng.random() < 0.25)):
                self.counts["stalls"] += 1
                await self._stall()
            return
        if self.kind == "outage" and self.in_window():
            self._fail(what, db, panic=what in ("write", "flush"))
        if self.kind == "errors" and rng.random() < self.error_rate:
            self._fail(what, db, panic=what in ("write", "flush") and rng.random() < 0.5)

    async def _stall(self) -> None:
        """A flush on a full disk: SlateDB retries until there is room again."""
        await asyncio.sleep(self.window_left())

    def lost_answer(self) -> bool:
        """A failed write or flush that did reach the store (its answer was lost)."""
        return self.rng.random() < 0.5

    def _fail(self, what: str, db: FaultyDb, *, panic: bool) -> None:
        self.counts["errors"] += 1
        if panic and not db.panicked:
            db.panicked = True
            self.counts["panics"] += 1
        raise sdb.Error.Unavailable(S3_DOWN.format(method=what.upper()))


@dataclass(slots=True)
class _Status:
    close_reason: Any


class FaultyDb:
    """The binding's ``Db`` with a :class:`FaultPlan` in front of every call."""

    def __init__(self, db: Any, plan: FaultPlan) -> None:
        self._db = db
        self._plan = plan
        self.panicked = False

    def _closed(self) -> None:
        if self.panicked:
            self._plan.counts["after_panic"] += 1
            raise sdb.Error.Unavailable("Unavailable error: wal unavailable (object store error)")

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        self._closed()
        try:
            await self._plan.before(what, self)
        except sdb.Error:
            if what in ("write", "flush") and self._plan.lost_answer():
                await call()  # it happened; the caller only hears that it failed
            raise
        return await call()

    async def get(self, key: bytes) -> Any:
        return await self._call("get", lambda: self._db.get(key))

    async def scan(self, key_range: Any) -> Any:
        return await self._call("scan", lambda: self._db.scan(key_range))

    async def scan_with_options(self, key_range: Any, options: Any) -> Any:
        return await self._call("scan", lambda: self._db.scan_with_options(key_range, options))

    async def write(self, batch: Any) -> Any:
        return await self._call("write", lambda: self._db.write(batch))

    async def flush(self) -> Any:
        return await self._call("flush", self._db.flush)

    async def flush_with_options(self, options: Any) -> Any:
        return await self._call("flush", lambda: self._db.flush_with_options(options))

    def status(self) -> Any:
        if self.panicked:
            return _Status(sdb.CloseReason.PANIC)
        return self._db.status()

    async def shutdown(self) -> Any:
        return await self._db.shutdown()
