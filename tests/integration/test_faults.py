"""A verified workload on S3 behind a fault proxy: right data or an error, never wrong.

moto_server holds the bucket; tests/support/faultproxy.py sits in front of it and,
per seeded schedule, answers 500/503, delays, resets, stalls past the
client's timeout, truncates answers, or lets a request through and loses
the answer. A libnbd client writes unique 64 KiB regions, flushes and reads
them back through a small cache (so reads reach S3 too):

* a read returns the region's acknowledged value (or, after a write that
  failed, that one or the failed one), or an error, never anything else;
* after a SIGKILL under faults and a restart, every region holds a value
  it may durably have (every write acknowledged before a successful FLUSH
  survives);
* once the faults stop, a FLUSH succeeds and a restart shows exactly the
  disk as it was read before the kill.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, nbd_handle
from tests.support.faultproxy import FaultProxy
from tests.support.reliability import REGION, ZERO_HASH, Budget, digest, pattern
from tests.support.s3 import MotoServer, moto_server

pytestmark = pytest.mark.timeout(600)

SEED = int(os.environ.get("PORTALBD_FAULT_SEED", "5"))
RATE = float(os.environ.get("PORTALBD_FAULT_RATE", "0.2"))
REGIONS = 48
SIZE = REGIONS * REGION


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    with moto_server(tmp_path) as server:
        yield server


class Workload:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seq = 0
        # values a region may hold now (more than one after a failed write)
        self.maybe: list[list[bytes]] = [[ZERO_HASH] for _ in range(REGIONS)]
        # values a region may hold after a crash: since the last good FLUSH
        self.durable: list[list[bytes]] = [[ZERO_HASH] for _ in range(REGIONS)]
        self.ok = {"write": 0, "read": 0, "flush": 0}
        self.errors = {"write": 0, "read": 0, "flush": 0}
        self.bytes_verified = 0

    def _remember(self, region: int, value: bytes, *, certain: bool) -> None:
        if certain:
            self.maybe[region] = [value]
        elif value not in self.maybe[region]:
            self.maybe[region].append(value)
        if value not in self.durable[region]:
            self.durable[region].append(value)

    def run(self, nbd: object, ops: int) -> None:
        import nbd as libnbd

        handle = nbd
        for _ in range(ops):
            roll = self.rng.random()
            region = self.rng.randrange(REGIONS)
            if roll < 0.45:
                self.seq += 1
                data = pattern(SEED, region, self.seq)
                try:
                    handle.pwrite(data, region * REGION)  # type: ignore[attr-defined]
                except libnbd.Error:
                    self.errors["write"] += 1
                    self._remember(region, digest(data), certain=False)
                    continue
                self.ok["write"] += 1
                self._remember(region, digest(data), certain=True)
            elif roll < 0.85:
                try:
                    got = handle.pread(REGION, region * REGION)  # type: ignore[attr-defined]
                except libnbd.Error:
                    self.errors["read"] += 1
                    continue
                self.ok["read"] += 1
                assert digest(got) in self.maybe[region], (
                    f"WRONG DATA: region {region} read a value it never had (seed {SEED})"
                )
                self.bytes_verified += REGION
            else:
                try:
                    handle.flush()  # type: ignore[attr-defined]
                except libnbd.Error:
                    self.errors["flush"] += 1
                    continue
                self.ok["flush"] += 1
                self.durable = [list(values) for values in self.maybe]

    def check_after_crash(self, observed: list[bytes]) -> None:
        bad = [r for r in range(REGIONS) if observed[r] not in self.durable[r]]
        assert not bad, f"regions {bad} lost a flushed write or hold garbage (seed {SEED})"
        self.maybe = [[value] for value in observed]
        self.durable = [[value] for value in observed]
        self.bytes_verified += SIZE


def read_all(daemon: RunningDaemon) -> list[bytes]:
    handle = nbd_handle(daemon.uri)
    try:
        return [digest(handle.pread(REGION, r * REGION)) for r in range(REGIONS)]
    finally:
        with contextlib.suppress(Exception):
            handle.shutdown()


def test_verified_workload_under_s3_faults(
    moto: MotoServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    bucket = moto.create_bucket("faults")
    config = tmp_path / "faults.toml"
    config.write_text("[storage.s3]\nrequest_timeout_ms = 1500\nmax_retries = 2\n")
    with FaultProxy(moto.port, seed=SEED, stall_seconds=3.0) as proxy:

        def start() -> RunningDaemon:
            proxy.rate = 0.0  # startup itself is not what this test is about
            daemon = daemon_factory(
                "-c",
                str(config),
                f"--size-bytes={SIZE}",
                "--cache-bytes",
                str(REGION * 4),
                storage_url=f"s3://{bucket}/disk",
                env=moto.env(proxy.endpoint),
            )
            proxy.rate = RATE
            return daemon

        work = Workload(SEED)
        daemon = start()
        budget = Budget(cycles=3)
        kills = 0
        while budget.more():
            handle = nbd_handle(daemon.uri)
            work.run(handle, 120)
            with contextlib.suppress(Exception):
                handle.shutdown()
            assert daemon.process.poll() is None, f"daemon died under faults:\n{daemon.log()}"
            daemon.kill()
            kills += 1
            daemon = start()
            proxy.rate = 0.0
            work.check_after_crash(read_all(daemon))
            proxy.rate = RATE

        # The faults stop: service must come back in full.
        handle = nbd_handle(daemon.uri)
        work.run(handle, 60)
        proxy.rate = 0.0
        handle.flush()
        before = read_all(daemon)
        with contextlib.suppress(Exception):
            handle.shutdown()
        daemon.kill()
        daemon = start()
        proxy.rate = 0.0
        assert read_all(daemon) == before, "a write flushed after the faults stopped was lost"
        # stopped while its endpoint (the proxy) still answers: a shutdown
        # flush against a closed port waits out every S3 retry
        assert daemon.stop() == 0
    print(
        f"faults seed={SEED} rate={RATE}: injected {dict(proxy.counts)}; ok {work.ok}; "
        f"errors {work.errors}; kills {kills}; bytes verified {work.bytes_verified}"
    )
    assert proxy.injected() > 0
