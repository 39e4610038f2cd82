"""What a daemon's unexpected exit cost its volume (csi/supervisor.py), as the
node reports it in NodeGetVolumeStats' volume_condition and in the
FAILED_PRECONDITION of the RPCs it refuses while the device is cut off."""

from __future__ import annotations

import json
from pathlib import Path

from portalbd.csi.supervisor import (
    condition_message,
    cut_off_reason,
    lost_writes,
    read_condition,
    record_condition,
)


def test_only_a_clean_exit_lost_nothing() -> None:
    assert lost_writes(0) is None
    assert lost_writes(-9) == "was killed by signal 9: writes since the last flush are lost"
    assert lost_writes(1) == "exited with code 1: writes since the last flush may be lost"
    assert lost_writes(None) == (
        "ended (exit status unknown): writes since the last flush may be lost"
    )


def test_an_unclean_exit_says_the_device_is_cut_off_and_what_to_do() -> None:
    assert condition_message(0) is None  # reconnected: nothing to say
    assert condition_message(-9) == (
        "the volume's daemon was killed by signal 9: writes since the last flush are lost; "
        "the device is cut off (its I/O fails): unstage and stage the volume again"
    )
    assert condition_message(None) == (
        "the volume's daemon ended (exit status unknown): writes since the last flush may be "
        "lost; the device is cut off (its I/O fails): unstage and stage the volume again"
    )


def test_condition_round_trip(tmp_path: Path) -> None:
    assert read_condition(tmp_path) == (False, "")
    assert cut_off_reason(tmp_path) is None
    record_condition(tmp_path, "the volume's daemon was killed by signal 9")
    assert read_condition(tmp_path) == (True, "the volume's daemon was killed by signal 9")
    assert cut_off_reason(tmp_path) == "the volume's daemon was killed by signal 9"
    (tmp_path / "condition.json").write_text("{not json")
    assert read_condition(tmp_path) == (False, "")
    assert cut_off_reason(tmp_path) is None


def test_a_condition_from_before_cutting_off_is_abnormal_but_not_cut_off(tmp_path: Path) -> None:
    """What an older driver wrote: abnormal, but its device was never cut off
    (SupervisedDaemon.start cuts it off)."""
    doc = {"abnormal": True, "message": "the volume's daemon was killed by signal 9"}
    (tmp_path / "condition.json").write_text(json.dumps(doc))
    assert read_condition(tmp_path) == (True, "the volume's daemon was killed by signal 9")
    assert cut_off_reason(tmp_path) is None
    (tmp_path / "condition.json").write_text("[]")  # not an object
    assert read_condition(tmp_path) == (False, "")
