"""What a daemon's unexpected exit cost its volume (csi/supervisor.py), as the
node reports it in NodeGetVolumeStats' volume_condition."""

from __future__ import annotations

from pathlib import Path

from portalbd.csi.supervisor import lost_writes, read_condition, record_condition


def test_only_a_clean_exit_lost_nothing() -> None:
    assert lost_writes(0) is None
    assert lost_writes(-9) == "was killed by signal 9: writes since the last flush are lost"
    assert lost_writes(1) == "exited with code 1: writes since the last flush may be lost"
    assert lost_writes(None) == (
        "ended (exit status unknown): writes since the last flush may be lost"
    )


def test_condition_round_trip(tmp_path: Path) -> None:
    assert read_condition(tmp_path) == (False, "")
    record_condition(tmp_path, "the volume's daemon was killed by signal 9")
    assert read_condition(tmp_path) == (True, "the volume's daemon was killed by signal 9")
    (tmp_path / "condition.json").write_text("{not json")
    assert read_condition(tmp_path) == (False, "")
