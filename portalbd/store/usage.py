"""How much object storage an instance occupies, sampled in the background.

SlateDB keeps no running total and its binding cannot list keys without
reading values, so we ask the storage itself: the size of the files under a
local directory, or of the objects under an S3 prefix. Listing a large
bucket is not free, so this runs rarely, off the event loop, and the last
figure is what ``status`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from portalbd.store.location import StorageLocation
from portalbd.store.s3 import S3Settings, _boto_client

log = logging.getLogger("portalbd.usage")


def measure(location: StorageLocation, s3: S3Settings | None) -> int | None:
    """Bytes stored under the instance prefix (None for memory storage)."""
    if location.kind == "file":
        total = 0
        for root, _dirs, files in os.walk("/" + location.prefix):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total
    if location.kind == "s3" and s3 is not None:
        client = _boto_client(s3)
        prefix = location.prefix + "/" if location.prefix else ""
        total = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3.bucket, Prefix=prefix
        ):
            total += sum(int(obj["Size"]) for obj in page.get("Contents", []))
        return total
    return None


class UsageSampler:
    def __init__(
        self, location: StorageLocation, s3: S3Settings | None, interval: float = 30.0
    ) -> None:
        self.location = location
        self.s3 = s3
        self.interval = interval
        self.used_bytes: int | None = None
        self.sampled_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.location.kind != "memory" and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.used_bytes = await asyncio.to_thread(measure, self.location, self.s3)
                self.sampled_at = time.time()
            except Exception as exc:  # storage hiccups must not stop sampling
                log.warning("measuring storage use failed: %s", exc)
            await asyncio.sleep(self.interval)
