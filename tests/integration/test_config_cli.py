"""The daemon's command line and TOML configuration, as an operator meets them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomlkit

from tests.conftest import DaemonFactory
from tests.support import nbd_handle, run_portalbd
from tests.support.tls import Certificates

EXIT_CONFIG = 2
EXIT_STARTUP = 1
FLAGS = [
    "--config",
    "--instance",
    "--disk-size-gb",
    "--size-bytes",
    "--storage-url",
    "--nbd-address",
    "--nbd-socket",
    "--export-name",
    "--max-connections",
    "--socket",
    "--block-size",
    "--cache-bytes",
    "--dirty-bytes",
    "--flush-interval-ms",
    "--read-only",
    "--log-level",
    "--trace",
    "--workload",
    "--metrics-address",
    "--tls-certificate",
    "--tls-key",
    "--tls-ca",
    "--tls",
    "--print-config",
    "--profile",
    "--profile-output",
    "--version",
]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(*args: str) -> str:
    """Run portalbd expecting a configuration error; return its message."""
    result = run_portalbd(*args)
    assert result.returncode == EXIT_CONFIG, result
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("portalbd: "), message
    assert "Traceback" not in message
    return message


def test_help_documents_every_flag() -> None:
    result = run_portalbd("--help")
    assert result.returncode == 0
    out = result.stdout
    for flag in FLAGS:
        # each flag appears in the option list with its own help text
        line = next((ln for ln in out.splitlines() if re.search(rf"{flag}\b", ln)), None)
        assert line is not None, flag
    assert "-c FILE, --config FILE" in out
    assert "file:///abs/dir, s3://bucket/prefix, or memory://" in out
    assert "examples:" in out


def test_print_config_shows_defaults_file_and_overrides(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "p.toml",
        'socket = "/tmp/x/control.sock"\n'
        "[device]\ndisk_size_gb = 3\nblock_size = 8192\n"
        '[storage]\nurl = "file:///var/lib/portalbd/p"\n'
        '[nbd]\naddress = "127.0.0.1:1234"\n'
        "[lsm]\nflush_interval_ms = 50\n",
    )
    result = run_portalbd(
        "-c", str(conf), "--disk-size-gb", "5", "--log-level", "debug", "--print-config"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = result.stdout
    assert printed.startswith("# portalbd effective configuration")
    effective = tomlkit.parse(printed).unwrap()
    assert effective["socket"] == "/tmp/x/control.sock"
    assert effective["log_level"] == "debug"  # flag
    assert effective["device"]["disk_size_gb"] == 5  # flag beats file
    assert effective["device"]["block_size"] == 8192  # file beats default
    assert effective["storage"]["url"] == "file:///var/lib/portalbd/p"
    assert effective["nbd"]["address"] == "127.0.0.1:1234"
    assert effective["nbd"]["export_name"] == "portalbd"  # default
    assert effective["lsm"]["flush_interval_ms"] == 50
    # what it prints is itself a valid configuration file
    again = run_portalbd("-c", str(write(tmp_path / "again.toml", printed)), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed


def test_tls_flags_are_checked_and_print_config_shows_paths_never_secrets(
    tmp_path: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config_error("--tls-key", "/k.pem") == (
        "portalbd: command line: nbd.tls.key: set without nbd.tls.certificate "
        "(the key's certificate)"
    )
    missing = tmp_path / "gone.pem"
    key = str(certs.server_key)
    message = config_error("--tls-certificate", str(missing), "--tls-key", key)
    assert (
        message
        == f"portalbd: nbd.tls.certificate: cannot read {missing}: No such file or directory"
    )
    assert "invalid choice: 'maybe'" in run_portalbd("--tls", "maybe").stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "print-config-must-not-show-this")
    result = run_portalbd(
        "--tls-certificate", str(certs.server_cert), "--tls-key", key, "--tls", "allow",
        "--storage-url", "s3://bucket/disk", "--print-config",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tls = tomlkit.parse(result.stdout).unwrap()["nbd"]["tls"]
    assert tls == {"mode": "allow", "certificate": str(certs.server_cert), "key": key}
    assert "print-config-must-not-show-this" not in result.stdout
    assert "PRIVATE KEY" not in result.stdout


def test_original_portalbd_config_file_is_accepted(tmp_path: Path) -> None:
    """The keys the Rust daemon's config files use keep working."""
    conf = write(
        tmp_path / "rust.toml",
        'socket = "/run/portalbd/control.sock"\n'
        "[device]\ndisk_size_gb = 10\n"
        '[storage]\nurl = "s3://bucket/prefix"\n'
        '[nbd]\naddress = "0.0.0.0:10809"\n'
        "[lsm]\nflush_interval_ms = 100\nl0_sst_size_bytes = 67108864\nl0_max_ssts = 8\n"
        "max_unflushed_bytes = 268435456\nfilter_bits_per_key = 10\n"
        'block_cache_size_bytes = 67108864\ncompression_codec = "zstd"\nsst_block_size = 4096\n'
        '[record]\npath = "/tmp/trace.jsonl.zst"\nworkload = "db"\n',
    )
    result = run_portalbd("-c", str(conf), "--print-config")
    assert result.returncode == 0, result.stderr
    effective = tomlkit.parse(result.stdout).unwrap()
    assert effective["device"]["disk_size_gb"] == 10
    assert effective["lsm"]["compression_codec"] == "zstd"
    assert effective["record"]["workload"] == "db"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    conf = write(tmp_path / "typo.toml", "[device]\nblock_sise = 4096\n")
    message = config_error("-c", str(conf))
    assert str(conf) in message
    assert "device.block_sise: unknown key" in message
    assert "block_size" in message  # the keys it could have meant
    conf = write(tmp_path / "top.toml", "[devices]\nx = 1\n")
    assert "devices: unknown key" in config_error("-c", str(conf))


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[device]\nblock_size = "big"\n', "device.block_size: expected an integer, got a string"),
        ("[nbd]\nmax_connections = 1.5\n", "nbd.max_connections: expected an integer"),
        ("[storage]\nurl = 5\n", "storage.url: expected a string"),
        ('device = "x"\n', "device: expected a table, got a string"),
        ('[device]\nread_only = "yes"\n', "device.read_only: expected a boolean"),
    ],
)
def test_wrong_type_names_file_key_and_expected_type(
    tmp_path: Path, toml: str, expected: str
) -> None:
    conf = write(tmp_path / "types.toml", toml)
    message = config_error("-c", str(conf))
    assert str(conf) in message
    assert expected in message


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert f"{missing}: cannot read config file: No such file or directory" in config_error(
        "-c", str(missing)
    )
    broken = write(tmp_path / "broken.toml", "[device\nx = 1\n")
    message = config_error("-c", str(broken))
    assert f"{broken}: not valid TOML" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://x/y", "unsupported storage scheme 'ftp'"),
        ("file://relative/dir", "file URLs need an absolute path"),
    ],
)
def test_invalid_storage_url(url: str, expected: str) -> None:
    message = config_error("--storage-url", url)
    assert "storage.url" in message and expected in message


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[lsm]\nobject_cache_dir = "cache"\n', "lsm.object_cache_dir: must be an absolute path"),
        (
            "[lsm]\nobject_cache_bytes = -1\n",
            "lsm.object_cache_bytes: must not be negative (0 turns the cache off)",
        ),
        ("[device]\nio_threads = 65\n", "device.io_threads: must be from 0 to 64, got 65"),
        (
            "[lsm]\nmax_unflushed_bytes = 67108864\n",
            "lsm.max_unflushed_bytes (67108864) must be greater than lsm.l0_sst_size_bytes",
        ),
        (
            "[storage]\nread_timeout_ms = -1\n",
            "storage.read_timeout_ms: must not be negative (0 means no bound)",
        ),
        (
            '[storage]\nencryption_key_file = ""\n',
            "storage.encryption_key_file: empty; give a path or leave it unset",
        ),
    ],
)
def test_data_plane_settings_are_checked(tmp_path: Path, toml: str, expected: str) -> None:
    conf = write(tmp_path / "dp.toml", toml)
    assert expected in config_error("-c", str(conf))


def test_io_threads_flag_is_checked() -> None:
    assert "device.io_threads: must be from 0 to 64, got -1" in config_error("--io-threads", "-1")


@pytest.mark.parametrize("size", ["5000", "1024", "2097152", "0"])
def test_block_size_must_be_a_power_of_two_in_range(size: str) -> None:
    message = config_error("--block-size", size)
    assert "device.block_size: must be a power of two from 4096 to 1048576" in message
    assert f"got {size}" in message


def test_config_error_from_file_names_the_file_even_when_a_flag_is_involved(
    tmp_path: Path,
) -> None:
    conf = write(tmp_path / "ok.toml", "[device]\nblock_size = 3000\n")
    message = config_error("-c", str(conf), "--disk-size-gb", "2")
    assert f"portalbd: {conf}" in message
    assert "device.block_size" in message and "got 3000" in message
    # a bad value that only the flags make bad names both sources
    conf = write(tmp_path / "small.toml", "[device]\nblock_size = 1048576\n")
    message = config_error("-c", str(conf), "--dirty-bytes", "4096")
    assert f"portalbd: {conf} + command line: device.dirty_bytes" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--nbd-address", "localhost"), "expected HOST:PORT"),
        (("--nbd-address", "127.0.0.1:99999"), "out of range"),
        (("--max-connections", "0"), "nbd.max_connections: must be at least 1"),
        (("--disk-size-gb", "0"), "device.disk_size_gb: must be at least 1"),
        (("--instance", "../etc"), "instance.name"),
        (("--nbd-address", ""), "nbd: set address, socket or both"),
        (("--storage-url", "s3://"), "S3 URLs look like s3://bucket/prefix"),
    ],
)
def test_bad_values_from_flags(args: tuple[str, ...], expected: str) -> None:
    message = config_error(*args)
    assert message.startswith("portalbd: command line: ")
    assert expected in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--bogus",), "unrecognized arguments: --bogus"),
        (("--disk-size-gb", "abc"), "argument --disk-size-gb: invalid int value: 'abc'"),
        (("--log-level", "verbose"), "argument --log-level: invalid choice: 'verbose'"),
    ],
)
def test_bad_flags_are_usage_errors(args: tuple[str, ...], expected: str) -> None:
    result = run_portalbd(*args)
    assert result.returncode == EXIT_CONFIG
    assert "usage: portalbd" in result.stderr
    assert expected in result.stderr


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    assert f"{tmp_path}: cannot read config file: Is a directory" in config_error(
        "-c", str(tmp_path)
    )


def startup_error(tmp_path: Path, *args: str) -> str:
    result = run_portalbd(
        "--socket", str(tmp_path / "probe.sock"), "--nbd-address", "127.0.0.1:0", *args
    )
    assert result.returncode == EXIT_STARTUP, result
    assert "Traceback" not in result.stderr
    return result.stderr


def test_reopen_checks_block_size_and_size(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/data"
    first = daemon_factory("--block-size", "4096", storage_url=url)
    handle = nbd_handle(first.uri)
    handle.pwrite(b"kept", 1 << 29)
    handle.shutdown()
    assert first.stop() == 0

    message = startup_error(tmp_path, "--storage-url", url, "--block-size", "65536")
    assert "this disk was created with block_size 4096" in message
    assert "cannot be reopened with block_size 65536" in message
    assert "set [device] block_size = 4096" in message

    message = startup_error(
        tmp_path, "--storage-url", url, "--block-size", "4096", "--size-bytes", str(1 << 29)
    )
    assert f"this disk is {1 << 30} bytes; shrinking it to {1 << 29} bytes" in message
    assert "refused" in message

    grown = daemon_factory("--block-size", "4096", storage_url=url, disk_size_gb=2)
    handle = nbd_handle(grown.uri)
    assert handle.get_size() == 2 << 30
    assert handle.pread(4, 1 << 29) == b"kept"
    handle.pwrite(b"tail", (2 << 30) - 4)
    handle.shutdown()
    assert grown.stop() == 0

    # An explicit size below the recorded one is still refused...
    message = startup_error(
        tmp_path, "--storage-url", url, "--block-size", "4096", "--disk-size-gb", "1"
    )
    assert f"this disk is {2 << 30} bytes; shrinking it to {1 << 30} bytes" in message

    # ...and no size at all serves the recorded (grown) one.
    again = daemon_factory("--block-size", "4096", storage_url=url, disk_size_gb=None)
    handle = nbd_handle(again.uri)
    assert handle.get_size() == 2 << 30
    assert handle.pread(4, (2 << 30) - 4) == b"tail"
    handle.shutdown()
    assert f"no size given: serving the recorded {2 << 30} bytes" in again.log()


def test_log_lines_on_start_and_stop(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    handle = nbd_handle(d.uri)
    handle.shutdown()
    assert d.stop() == 0
    log = d.log()
    assert f"NBD listening address=127.0.0.1:{d.port} export=portalbd" in log
    assert "started instance=t size=1073741824 block_size=65536 storage=memory://" in log
    assert "client connected" in log and "client disconnected" in log
    assert "shutdown complete flush=ok" in log
