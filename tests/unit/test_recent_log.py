"""The daemon's in-memory ring of recent log records (what `Log` returns)."""

from __future__ import annotations

import logging
import threading

from portalbd.log import MAX_MESSAGE, RecentLog, entry_line


def _logger(ring: RecentLog) -> logging.Logger:
    logger = logging.getLogger(f"test.recent.{id(ring)}")
    logger.propagate = False
    logger.handlers[:] = [ring]
    logger.setLevel(logging.DEBUG)
    return logger


def test_the_ring_keeps_the_newest_records_bounded_in_count_and_length() -> None:
    ring = RecentLog(capacity=5)
    log = _logger(ring)
    for n in range(8):
        log.info("line %d", n)
    log.warning("x" * (MAX_MESSAGE + 100))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    tail = ring.tail(100)
    assert [e["seq"] for e in tail] == [5, 6, 7, 8, 9]  # the last 5 of 10, oldest first
    assert tail[0]["message"] == "line 5" and tail[0]["level"] == "info"
    assert len(tail[-2]["message"]) == MAX_MESSAGE and tail[-2]["message"].endswith("…")
    assert (
        tail[-1]["message"].startswith("it failed\nTraceback")
        and "ValueError: boom" in (tail[-1]["message"])
    )
    assert [e["seq"] for e in ring.tail(2)] == [8, 9]
    assert [e["seq"] for e in ring.tail(100, after=7)] == [8, 9]  # only what is new
    assert ring.tail(100, after=9) == [] and ring.tail(0) == []
    line = entry_line(
        {"time": 1764651000.25, "level": "info", "logger": "portalbd.x", "message": "hi"}
    )
    assert line == "2025-12-02T04:50:00.250Z info    portalbd.x: hi"


def test_records_from_threads_are_all_kept_in_order() -> None:
    ring = RecentLog(capacity=1000)
    log = _logger(ring)

    def chatter() -> None:
        for n in range(200):
            log.debug("n=%d", n)

    threads = [threading.Thread(target=chatter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e["seq"] for e in ring.tail(1000)]
    assert seqs == list(range(800))
