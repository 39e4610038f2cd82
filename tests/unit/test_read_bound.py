"""Reads wait out a busy store and fail on a silent one (store/read_bound.py)."""

from __future__ import annotations

import asyncio

import pytest

from portalbd.store.read_bound import ReadBound


async def answer_after(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "data"


async def steady_answers(bound: ReadBound, every: float, until: float) -> None:
    """Other reads that the store keeps answering."""
    loop = asyncio.get_running_loop()
    end = loop.time() + until
    while loop.time() < end:
        await bound.run(answer_after(every))


def test_a_slow_read_behind_a_busy_queue_is_waited_out() -> None:
    async def main() -> str:
        bound = ReadBound(timeout=0.2, cap=5)
        others = asyncio.create_task(steady_answers(bound, 0.03, 0.8))
        try:
            return await bound.run(answer_after(0.6))  # three timeouts long
        finally:
            await others

    assert asyncio.run(main()) == "data"


def test_a_silent_store_fails_reads_after_the_timeout() -> None:
    async def main() -> float:
        bound = ReadBound(timeout=0.2, cap=5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await bound.run(answer_after(10))
        assert bound.silent()
        return loop.time() - started

    assert 0.19 < asyncio.run(main()) < 1.0


def test_a_read_the_store_never_answers_fails_at_the_cap() -> None:
    async def main() -> float:
        bound = ReadBound(timeout=0.1, cap=0.5)
        others = asyncio.create_task(steady_answers(bound, 0.02, 1.0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(TimeoutError):
                await bound.run(answer_after(10))
            assert not bound.silent()  # the store was busy, not down
            return loop.time() - started
        finally:
            await others

    assert 0.45 < asyncio.run(main()) < 0.9


def test_an_error_counts_as_an_answer() -> None:
    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise OSError("disk said no")

    async def main() -> bool:
        bound = ReadBound(timeout=0.2, cap=1)
        with pytest.raises(OSError, match="disk said no"):
            await bound.run(failing())
        return bound.silent()

    assert asyncio.run(main()) is False
