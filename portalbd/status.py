"""The status document: one instance's state as the control protocol reports it.

Kept apart from the instance so the shape of what operators see (fields,
units, the names docs/control-protocol.md lists) is in one place.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from portalbd import __version__
from portalbd.store.sealing import CIPHER

if TYPE_CHECKING:
    from portalbd.instance import Instance


def status_document(instance: Instance) -> dict[str, Any]:
    """What ``portalctl status``, the TUI and the metrics exporter show."""
    assert instance.device is not None and instance.store is not None
    device = instance.device
    stats = instance.stats.as_dict()
    stats["dirty_bytes"] = device.dirty_bytes + device.draining_bytes
    stats["cached_bytes"] = device.cached_bytes
    if instance.usage is not None and instance.usage.used_bytes is not None:
        stats["used_bytes"] = instance.usage.used_bytes  # object storage taken
    allocated = instance.allocation.allocated_bytes
    if allocated is not None:  # blocks holding data (not holes), once the opening scan is done
        stats["allocated_bytes"] = allocated
    progress = instance.allocation.scan_progress
    if progress is not None:  # meanwhile: how much of the disk that scan has covered
        stats["allocation_scan_progress"] = round(progress, 3)
    if instance.allocation.not_counted is not None:  # too much stored to count at start
        stats["allocation_not_counted"] = instance.allocation.not_counted
    stats["store"] = instance.store.counters.as_dict()
    # "ok", or why storage last failed (full, read-only, gone, unreachable)
    stats["storage_state"] = instance.store.data.health
    stats["object_store"] = instance.store.object_metrics.as_dict()
    stats["device"] = {
        "loads": device.counters.loads,
        "drains": device.counters.drains,
        "drained_blocks": device.counters.drained_blocks,
        "cache_hits": device.counters.cache_hits,
        "cache_misses": device.counters.cache_misses,
        # shadowed page deltas removed when their block was written whole
        "deltas_deleted": device.counters.deltas_deleted,
    }
    tls = instance.server.tls_mode.value if instance.server is not None else "off"
    return {
        "size_bytes": device.size,
        "block_count": -(-device.size // device.block_size),
        "snapshot_count": len(instance.store.catalog.snapshots),
        "nbd_address": instance.nbd_address,
        "nbd_socket": instance.config.nbd.socket,
        # "require", "allow" or "off": whether a plain-text client is served
        "nbd_tls": tls,
        "nbd_tls_client_certificates": tls != "off" and bool(instance.config.nbd.tls.ca),
        "instance": instance.name,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - instance.started_at, 3),
        "storage_url": instance.location.display,
        # memory storage: everything is lost when the daemon exits
        "ephemeral": instance.location.ephemeral,
        "block_size": device.block_size,
        "control_socket": str(instance.control_socket),
        "generation": instance.store.catalog.live_generation,
        "recording": instance.recorder is not None,
        "s3": instance.s3.describe() if instance.s3 is not None else None,
        # the local cache of object-store parts (S3 disks), or None
        "object_cache_dir": instance.store.object_cache_dir,
        # the cipher of an encrypted disk (docs/security.md), else None; never a key
        "encryption": None if instance.sealer is None else CIPHER,
        "clients": instance.server.client_list() if instance.server is not None else [],
        "last_restore": instance.last_restore,
        "read_only": instance.config.device.read_only,
        # --read-only: what it serves (follow the writer, or one snapshot) and its lag
        "replica": instance.replica.public() if instance.replica is not None else None,
        # [snapshots] every = ...: the policy, the next slot and how it went; None when off
        "snapshot_schedule": None if instance.scheduler is None else instance.scheduler.public(),
        "stats": stats,
    }
