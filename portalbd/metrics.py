"""Prometheus metrics, rendered by the standard client library.

A custom collector reads the same statistics as ``status`` at scrape time,
so nothing is counted twice and the hot path pays nothing for metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from portalbd.config import parse_address

if TYPE_CHECKING:
    from portalbd.instance import Instance


class InstanceCollector:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        status = self.instance.status()
        stats: dict[str, Any] = status["stats"]
        labels = ["instance"]
        name = [status["instance"]]

        def gauge(metric: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(f"portalbd_{metric}", doc, labels=labels)
            family.add_metric(name, value)
            return family

        def counter(metric: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(f"portalbd_{metric}", doc, labels=labels)
            family.add_metric(name, value)
            return family

        yield gauge("size_bytes", "Size of the disk", status["size_bytes"])
        yield gauge("uptime_seconds", "Seconds since start", status["uptime_s"])
        yield gauge("snapshots", "Number of snapshots", status["snapshot_count"])
        yield gauge("connections", "Connected NBD clients", stats["connections"])
        yield gauge("dirty_bytes", "Bytes buffered, not yet in the store", stats["dirty_bytes"])
        yield gauge("cached_bytes", "Bytes in the clean block cache", stats["cached_bytes"])
        yield counter("read_bytes", "Bytes read by clients", stats["bytes_read"])
        yield counter("written_bytes", "Bytes written by clients", stats["bytes_written"])
        yield counter("errors", "Requests answered with an error", stats["errors"])
        yield counter("flushes", "Completed flush rounds", stats["flush_count"])
        commands = CounterMetricFamily(
            "portalbd_requests", "NBD requests by command", labels=["instance", "command"]
        )
        for command, count in stats["commands"].items():
            commands.add_metric([status["instance"], command], count)
        yield commands
        store = CounterMetricFamily(
            "portalbd_store_operations", "Calls into SlateDB", labels=["instance", "operation"]
        )
        for op, count in stats["store"].items():
            if not op.startswith("bytes_"):
                store.add_metric([status["instance"], op], count)
        yield store
        objects = stats.get("object_store", {})
        requests = CounterMetricFamily(
            "portalbd_object_store_requests",
            "Object-store requests SlateDB sent, by request class",
            labels=["instance", "request"],
        )
        for request in ("put", "get", "head", "list", "delete"):
            requests.add_metric([status["instance"], request], objects.get(request, 0))
        yield requests
        yield counter(
            "object_store_errors", "Object-store requests that failed", objects.get("errors", 0)
        )
        uploaded = CounterMetricFamily(
            "portalbd_object_store_put_bytes",
            "Bytes SlateDB uploaded, by kind of object",
            labels=["instance", "kind"],
        )
        for kind in ("wal", "sst", "compacted"):
            uploaded.add_metric([status["instance"], kind], objects.get(f"{kind}_bytes_put", 0))
        yield uploaded
        latency = GaugeMetricFamily(
            "portalbd_latency_seconds",
            "Request latency percentiles",
            labels=["instance", "command", "quantile"],
        )
        for command, summary in stats["latency_us"].items():
            for q in ("p50", "p90", "p99"):
                latency.add_metric(
                    [status["instance"], command, q.removeprefix("p")], summary[q] / 1e6
                )
        yield latency


async def serve_metrics(instance: Instance, address: str) -> asyncio.AbstractServer:
    """A tiny HTTP endpoint on the event loop: GET anything -> metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(InstanceCollector(instance))
    host, port = parse_address(address, "metrics.address")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            body = generate_latest(registry)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
