"""How ``portalctl`` and the TUI show the snapshot schedule."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from portalbd.portalctl import print_snapshot_list
from portalbd.snapshot_schedule import schedule_text
from tui.model import Fleet, Status
from tui.view import summary_lines

SCHEDULE: dict[str, Any] = {
    "every": "15m",
    "every_s": 900,
    "keep": 96,
    "keep_daily": 7,
    "keep_weekly": 4,
    "next_at": 1764646200,
    "last_error": None,
}


def test_policy_and_next_slot() -> None:
    assert schedule_text(SCHEDULE) == (
        "every 15m, keep 96 + 7 daily + 4 weekly; next 2025-12-02 03:30:00 UTC"
    )
    assert schedule_text({**SCHEDULE, "keep_daily": 0, "keep_weekly": 0}).startswith(
        "every 15m, keep 96; next "
    )


def test_a_failed_slot_is_shown() -> None:
    error = "snapshot auto-20251202T031500Z: flush failed: storage /d is read-only"
    assert schedule_text({**SCHEDULE, "last_error": error}).endswith(
        f"; last attempt failed: {error}"
    )


def test_scheduled_snapshots_are_marked_and_manual_rows_unchanged() -> None:
    out = io.StringIO()
    snaps = [
        {"name": "mine", "id": "1", "created_at": 0, "size_bytes": 0},
        {"name": "auto-20251202T031500Z", "id": "2", "created_at": 0, "size_bytes": 0},
        {"name": "auto-nightly", "id": "3", "created_at": 0, "size_bytes": 0},
    ]
    print_snapshot_list(snaps, out)
    rows = out.getvalue().splitlines()
    assert rows[1].endswith("0 B") and rows[3].endswith("0 B")
    assert rows[2].endswith("0 B  scheduled")


def test_the_tui_shows_the_schedule_only_when_there_is_one() -> None:
    inst, _ = Fleet().add(Path("/run/portalbd/s/control.sock"))
    inst.record_status(0.0, 0.0, Status.from_json({"snapshot_schedule": SCHEDULE}))
    lines = [text.plain for text in summary_lines(inst)]
    assert f"scheduled snapshots {schedule_text(SCHEDULE)}" in lines
    assert Status.from_json({"snapshot_schedule": None}).snapshot_schedule is None
