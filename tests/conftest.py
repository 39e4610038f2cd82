from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import RunningDaemon, start_daemon
from tests.support.tls import Certificates, make_certificates

DaemonFactory = Callable[..., RunningDaemon]


@pytest.fixture(scope="session", autouse=True)
def _object_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons on S3 cache objects locally by default (paths.object_cache_root):
    every daemon a test starts, by any route, caches under pytest's tmp, never
    in the host's /var/cache/portalbd or ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CACHE_DIRECTORY", str(tmp_path_factory.mktemp("object-cache")))
    yield
    patch.undo()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start daemons with ``start_daemon``; every one is stopped afterwards."""
    started: list[RunningDaemon] = []

    def factory(*args: str, workdir: Path | None = None, **kwargs: Any) -> RunningDaemon:
        daemon = start_daemon(workdir or tmp_path, *args, **kwargs)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        if daemon.process.poll() is None:
            try:
                daemon.stop(timeout=30)
            except Exception:
                daemon.kill()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> RunningDaemon:
    """One daemon on memory storage."""
    return daemon_factory()


@pytest.fixture
def file_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> RunningDaemon:
    """One daemon on file storage under tmp_path/data."""
    return daemon_factory(storage_url=f"file://{tmp_path}/data")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, a server and client certificates, and a stranger CA (tests/support/tls.py)."""
    return make_certificates(tmp_path_factory.mktemp("certs"))
