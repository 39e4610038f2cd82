"""How long a read may wait for the store: until the store stops answering.

A fixed deadline per read cannot tell an outage from a queue. On S3 a
burst of 32 random reads behind a compaction can take seconds each while
the store answers every few milliseconds; failing those reads with EIO
would turn a busy disk into a broken filesystem. So a read fails after
``timeout`` only when *no* read has completed in the last ``timeout``
seconds (the store has stopped answering), and in any case after ``cap``.

Cheap on the hot path: each read arms one ``asyncio.timeout`` as before; a
single watchdog, running only while reads wait, pushes the deadlines of
waiting reads forward while others keep completing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class ReadBound:
    """Bounds awaited reads by the store's silence rather than their own age."""

    def __init__(self, timeout: float, cap: float) -> None:
        self.timeout = timeout
        self.cap = max(cap, timeout)
        self._waiting: dict[asyncio.Timeout, float] = {}  # deadline -> latest allowed
        self._last_answer = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; TimeoutError once the store has been silent too long."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(self.timeout) as deadline:
            self._waiting[deadline] = started + self.cap
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.timeout / 4, self._watch)
            try:
                result = await awaitable
            except asyncio.CancelledError:
                raise
            except BaseException:
                self._last_answer = loop.time()  # an error is an answer too
                raise
            finally:
                del self._waiting[deadline]
        self._last_answer = loop.time()
        return result

    def silent(self) -> bool:
        """Whether no read has been answered for ``timeout`` (the store is down)."""
        return asyncio.get_running_loop().time() - self._last_answer >= self.timeout

    def _watch(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_answer < self.timeout:
            for deadline, latest in self._waiting.items():
                when = deadline.when()
                later = min(latest, self._last_answer + self.timeout)
                if not deadline.expired() and when is not None and later > when:
                    deadline.reschedule(later)
        self._watchdog = loop.call_later(self.timeout / 4, self._watch)
