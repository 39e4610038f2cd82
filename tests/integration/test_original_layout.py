"""A disk made by the original (Rust) portalbd is refused with a way out, never served blank."""

from __future__ import annotations

from pathlib import Path

from tests.support import run_portalbd
from tests.support.original import build_original_disk, original_block


def test_original_file_layout_is_refused_and_left_untouched(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/disk"
    path = build_original_disk(url, {0: original_block(0), 7: original_block(7)}, snapshot="s1")
    assert path == f"{str(tmp_path).lstrip('/')}/disk/portalbd"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    result = run_portalbd(
        "--storage-url", url, "--nbd-address", "127.0.0.1:0", "--socket", str(tmp_path / "c.sock")
    )

    assert result.returncode == 1, result.stderr
    assert "holds a disk of the original (Rust) portalbd" in result.stderr
    assert f"one SlateDB at {tmp_path}/disk/portalbd" in result.stderr
    assert "its snapshots: s1" in result.stderr
    assert "nbdcopy nbd://ORIGINAL_HOST:PORT/portalbd" in result.stderr
    # no catalog, no generation: nothing was created beside the original
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "disk" / "catalog").exists()
