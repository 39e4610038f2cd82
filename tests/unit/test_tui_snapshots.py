"""Screenshots of the main screens compared with the stored SVGs.

The app is built from `tui.demo`'s fixed fleet with polling off, so nothing on
screen depends on the clock or on a daemon: rates, charts and events come from
made-up samples at made-up times. Update with `pytest --snapshot-update` and
look at the report before committing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tui.app import PortalbdApp
from tui.config import Settings
from tui.demo import demo_fleet

SnapCompare = Callable[..., bool]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Times are shown in local time: pin the zone so the pictures are the same everywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make_app(theme: str = "textual-dark") -> PortalbdApp:
    return PortalbdApp(Settings(discover=False, theme=theme), fleet=demo_fleet(), live=False)


SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.mark.parametrize("size", SIZES)
def test_overview(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    # "down" moves the cursor from the stopped "backup" to "db", whose chart has data.
    assert snap_compare(make_app(), press=["down"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_instance(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(make_app(), press=["down", "enter"], terminal_size=size)


def test_overview_light(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app("textual-light"), press=["down"], terminal_size=(80, 24))


def test_restore_confirmation(snap_compare: SnapCompare) -> None:
    async def open_restore(pilot: Any) -> None:
        await pilot.press("down", "enter")
        await pilot.pause()
        await pilot.press("down", "r")

    assert snap_compare(make_app(), run_before=open_restore, terminal_size=(80, 24))
