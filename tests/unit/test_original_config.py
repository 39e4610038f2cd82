"""Config files written for the original (Rust) portalbd load with the values it read.

The values are the original's own: its README's configuration, the defaults
of its ``config.rs`` written out (SlateDB's serde names), and the settings
its NixOS tests render.
"""

from __future__ import annotations

import pytest

from portalbd.config import ConfigError, parse
from portalbd.daemon import read_original_nbd_socket
from tests.support.original import README_CONFIG

# config.rs's LsmConfig::default(), as a file would spell it
SOURCE_DEFAULTS = """\
[lsm]
flush_interval_ms = 0
l0_sst_size_bytes = 268435456
compression_codec = "Lz4"
sst_block_size = "Block64Kib"
"""

# nix/nixos/tests/crash-recovery.nix and trace-mkfs.nix settings, rendered
NIXOS_TEST_SETTINGS = """\
socket = "/run/portalbd-test/portalbd.sock"
[device]
disk_size_gb = 1
[storage]
url = "s3://portalbd-test/data"
[nbd]
address = "127.0.0.1:10809"
[lsm]
flush_interval_ms = 100
l0_max_ssts = 64
[record]
path = "/var/lib/portalbd-test/mkfs.trace.json"
workload = "mkfs.ext4"
"""


def test_readme_config_loads() -> None:
    config = parse(README_CONFIG)
    assert config.device.disk_size_gb == 10
    assert config.storage.url == "s3://bucket/path"
    assert config.nbd.address == "127.0.0.1:10809"
    assert config.lsm.flush_interval_ms == 1000
    assert config.lsm.l0_sst_size_bytes == 64 * 1024 * 1024


def test_readme_nbd_socket_is_the_control_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/tmp/portalbd-unit")
    config = parse(README_CONFIG)
    notes: list[str] = []
    read_original_nbd_socket(config, notes)
    assert config.socket == "/tmp/portalbd-unit/portalbd.sock"
    assert config.nbd.socket is None
    assert notes == [
        "[nbd] socket = '/run/portalbd/portalbd.sock' is the original portalbd's control "
        "socket: control socket /tmp/portalbd-unit/portalbd.sock, no NBD Unix socket "
        "(use --nbd-socket for one)"
    ]


def test_other_nbd_sockets_stay_nbd_listeners() -> None:
    config = parse('[nbd]\nsocket = "/run/portalbd/disk0/nbd.sock"\n')
    notes: list[str] = []
    read_original_nbd_socket(config, notes)
    assert (config.nbd.socket, config.socket, notes) == ("/run/portalbd/disk0/nbd.sock", None, [])


def test_a_top_level_socket_wins_as_in_the_original() -> None:
    config = parse('socket = "/tmp/c.sock"\n[nbd]\nsocket = "/run/portalbd/portalbd.sock"\n')
    read_original_nbd_socket(config, [])
    assert (config.socket, config.nbd.socket) == ("/tmp/c.sock", None)


def test_source_defaults_load_with_slatedb_names() -> None:
    config = parse(SOURCE_DEFAULTS)
    assert config.lsm.sst_block_bytes() == 65536
    assert config.lsm.compression_codec == "Lz4"
    assert config.lsm.flush_interval_ms == 0
    # SlateDB's own budget (1 GiB) held the original's 256 MiB L0 tables;
    # ours is raised to hold two of them rather than refuse the file
    assert config.lsm.max_unflushed_bytes == 2 * 268435456


def test_nixos_test_settings_load() -> None:
    config = parse(NIXOS_TEST_SETTINGS)
    assert config.socket == "/run/portalbd-test/portalbd.sock"
    assert config.lsm.l0_max_ssts == 64
    assert config.record.workload == "mkfs.ext4"


@pytest.mark.parametrize(
    ("name", "size"),
    [(f"Block{k}Kib", k * 1024) for k in (1, 2, 4, 8, 16, 32, 64)] + [("block4kib", 4096)],
)
def test_every_slatedb_block_size_name(name: str, size: int) -> None:
    assert parse(f'[lsm]\nsst_block_size = "{name}"\n').lsm.sst_block_bytes() == size


@pytest.mark.parametrize("codec", ["Lz4", "Zstd", "Snappy", "Zlib", "lz4", "zstd"])
def test_every_slatedb_codec_name(codec: str) -> None:
    assert parse(f'[lsm]\ncompression_codec = "{codec}"\n').lsm.compression_codec == codec


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"Block128Kib"', "got 'Block128Kib'"),
        ("3000", "got 3000"),
        ("true", "lsm.sst_block_size: expected an integer or a string, got a boolean"),
    ],
)
def test_bad_block_size_names_both_forms(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(f"[lsm]\nsst_block_size = {value}\n")
    assert expected in str(err.value)
    if "got a boolean" not in expected:
        assert "65536 (bytes) or SlateDB's name for one (Block1Kib" in str(err.value)


def test_unknown_codec_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="must be one of none, lz4, snappy, zlib, zstd"):
        parse('[lsm]\ncompression_codec = "Brotli"\n')


def test_an_explicit_unflushed_budget_is_still_checked() -> None:
    with pytest.raises(ConfigError, match="must be greater than"):
        parse("[lsm]\nl0_sst_size_bytes = 268435456\nmax_unflushed_bytes = 134217728\n")
