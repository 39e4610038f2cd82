"""Reads that complete on the binding's worker threads, several per handoff.

The binding turns a value it returns into Python bytes on whichever thread
completes the call, one element at a time: about 240 us of a 64 KiB get,
all of it on the event loop when the loop awaits the call itself. The copy
releases the GIL, so completing reads on worker threads (each with an event
loop of its own) leaves the protocol loop free and lets several reads copy
at once on a host with cores to spare.

A thread handoff costs tens of microseconds, so reads that arrive while the
workers are busy wait in a queue and go over together: a worker awaits a
whole batch concurrently on its own loop, and one handoff back carries
every result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

ReadCall = Callable[[], Awaitable[Any]]

BATCH_LIMIT = 32  # reads one worker awaits at once

_thread_state = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """The calling worker thread's own event loop, made on first use."""
    loop: asyncio.AbstractEventLoop | None = getattr(_thread_state, "loop", None)
    if loop is None:
        loop = asyncio.new_event_loop()
        _thread_state.loop = loop
    return loop


def run_batch(calls: list[ReadCall], timeout: float | None) -> list[Any]:
    """Await ``calls`` concurrently on this thread's loop; results or exceptions.

    Each call is bounded here too, so a hung store frees the worker at the
    timeout instead of holding it after the caller gave up.
    """

    async def bounded(call: ReadCall) -> Any:
        async with asyncio.timeout(timeout):
            return await call()

    async def every() -> list[Any]:
        return await asyncio.gather(*(bounded(call) for call in calls), return_exceptions=True)

    return _thread_loop().run_until_complete(every())


class ReadBatcher:
    """Queue reads for the worker threads; at most ``jobs()`` batches in flight."""

    def __init__(self, executor: Callable[[], Executor | None], jobs: Callable[[], int]) -> None:
        self._executor = executor
        self._jobs = jobs
        self._waiting: list[tuple[ReadCall, asyncio.Future[Any]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def available(self) -> bool:
        return self._executor() is not None and self._jobs() > 0

    async def run(self, call: ReadCall, bound_s: float | None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((call, future))
        self._start(bound_s)
        return await future

    def _start(self, bound_s: float | None) -> None:
        while self._waiting and self._running < self._jobs():
            batch, self._waiting = self._waiting[:BATCH_LIMIT], self._waiting[BATCH_LIMIT:]
            batch = [(call, future) for call, future in batch if not future.done()]
            if not batch:
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._job(batch, bound_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _job(
        self, batch: list[tuple[ReadCall, asyncio.Future[Any]]], bound_s: float | None
    ) -> None:
        calls = [call for call, _ in batch]
        try:
            executor = self._executor()
            if executor is None:
                results = await run_inline(calls)
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(executor, run_batch, calls, bound_s)
        except BaseException as exc:  # the executor shut down, or we were cancelled
            results = [exc] * len(batch)
            if isinstance(exc, asyncio.CancelledError):
                for _, future in batch:
                    future.cancel()
                raise
        finally:
            self._running -= 1
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller gave up (timeout, disconnect)
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._start(bound_s)


async def run_inline(calls: list[ReadCall]) -> list[Any]:
    return await asyncio.gather(*(call() for call in calls), return_exceptions=True)
