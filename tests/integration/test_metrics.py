"""Scrape the Prometheus endpoint of a real daemon and compare with its status."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonFactory
from tests.support import RunningDaemon, connected, free_port, run_portalbd, wait_for_port


def scrape(port: int) -> tuple[str, dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(
                f"|{k}={v}" for k, v in sorted(sample.labels.items()) if k != "instance"
            )
            assert sample.labels.get("instance") == "met"
            samples[key] = sample.value
    return content_type, samples


@pytest.fixture
def metrics_daemon(daemon_factory: DaemonFactory) -> tuple[RunningDaemon, int]:
    port = free_port()
    daemon = daemon_factory("--metrics-address", f"127.0.0.1:{port}", instance="met")
    wait_for_port(port, daemon.process)  # it opens after the NBD listener
    return daemon, port


def test_scrape_matches_status(metrics_daemon: tuple[RunningDaemon, int]) -> None:
    daemon, port = metrics_daemon
    with connected(daemon.uri) as handle:
        handle.pwrite(b"m" * 65536, 0)
        handle.pwrite(b"n" * 4096, 1 << 20)
        handle.pread(8192, 0)
        handle.flush()
        daemon.control({"SnapshotCreate": {"name": "m1"}})
        content_type, samples = scrape(port)
        status = daemon.status()
    assert content_type.startswith("text/plain; version=0.0.4")
    stats = status["stats"]
    assert samples["portalbd_size_bytes"] == 1 << 30
    assert samples["portalbd_snapshots"] == 1
    assert samples["portalbd_connections"] == 1
    assert samples["portalbd_written_bytes_total"] == 65536 + 4096 == stats["bytes_written"]
    assert samples["portalbd_read_bytes_total"] == 8192 == stats["bytes_read"]
    assert samples["portalbd_requests_total|command=write"] == 2
    assert samples["portalbd_requests_total|command=read"] == 1
    assert samples["portalbd_requests_total|command=flush"] == 1
    assert samples["portalbd_flushes_total"] >= 1
    assert samples["portalbd_errors_total"] == 0
    assert samples["portalbd_uptime_seconds"] > 0
    assert "portalbd_latency_seconds|command=write|quantile=99" in samples
    assert samples["portalbd_store_operations_total|operation=flushes"] >= 1
    assert "portalbd_object_store_requests_total|request=put" in samples


def test_counters_grow_between_scrapes(metrics_daemon: tuple[RunningDaemon, int]) -> None:
    daemon, port = metrics_daemon
    _, first = scrape(port)
    with connected(daemon.uri) as handle:
        handle.pwrite(b"x" * 65536, 0)
    _, second = scrape(port)
    assert second["portalbd_written_bytes_total"] - first["portalbd_written_bytes_total"] == 65536
    assert second["portalbd_connections"] == 0


def test_garbage_and_silent_clients_do_not_break_the_endpoint(
    metrics_daemon: tuple[RunningDaemon, int],
) -> None:
    _, port = metrics_daemon
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as garbage:
            garbage.sendall(b"\x00\xff not http\r\n\r\n")
            assert garbage.recv(65536).startswith(b"HTTP/1.1 200 OK")
        # A client that sends nothing does not hold up others.
        _, samples = scrape(port)
        assert samples["portalbd_snapshots"] == 0
        silent.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert silent.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_metrics_off_by_default() -> None:
    result = run_portalbd("--print-config")
    assert result.returncode == 0
    assert "[metrics]\n# address = (unset)\n" in result.stdout


def test_bad_metrics_address_is_a_startup_error(tmp_path: Path) -> None:
    result = run_portalbd(
        "--metrics-address",
        "nowhere",
        "--nbd-address",
        "127.0.0.1:0",
        "--socket",
        str(tmp_path / "c.sock"),
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "portalbd: command line: metrics.address: expected HOST:PORT, got 'nowhere'\n"
    )
