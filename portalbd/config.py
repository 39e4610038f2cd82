"""Instance configuration: defaults, the TOML file, and command-line overrides.

Pure logic: reading the file is the only I/O. Every key is declared once in
the dataclasses below; the loader walks the TOML document against them so an
unknown key or a wrong type is reported with the file, the key and the
expected type, and the daemon never starts half-configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions

from portalbd.retention import parse_duration

GIB = 1024**3
MIB = 1024**2


class ConfigError(ValueError):
    """The configuration is unusable; the message names what and where."""


def default_io_threads() -> int:
    """Threads that copy bytes into the binding: one per core, at most 8.

    The copy releases the GIL, so threads scale with cores until the event
    loop (which still awaits every write) becomes the limit.
    """
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(slots=True)
class InstanceConfig:
    name: str = "default"


DEFAULT_DISK_SIZE_GB = 1


@dataclass(slots=True)
class DeviceConfig:
    # Neither set: an existing disk keeps its recorded size, a new one gets
    # DEFAULT_DISK_SIZE_GB (store/metadata.py).
    disk_size_gb: int | None = None
    size_bytes: int | None = None
    block_size: int = 64 * 1024
    cache_bytes: int = 128 * MIB
    dirty_bytes: int = 64 * MIB
    read_only: bool = False
    # with read_only: serve this snapshot instead of following the live disk
    snapshot: str | None = None
    # threads that copy bytes into SlateDB (store/slate.py); 0 = on the loop
    io_threads: int = field(default_factory=default_io_threads)

    def requested_size(self) -> int | None:
        """The size the operator asked for in bytes; None when they asked for none."""
        if self.size_bytes is not None:
            return self.size_bytes
        return None if self.disk_size_gb is None else self.disk_size_gb * GIB

    def effective_size(self) -> int:
        """The size a new disk gets."""
        requested = self.requested_size()
        return DEFAULT_DISK_SIZE_GB * GIB if requested is None else requested


@dataclass(slots=True)
class S3Config:
    endpoint: str | None = None
    region: str | None = None
    allow_http: bool | None = None
    path_style: bool | None = None
    request_timeout_ms: int = 10_000
    max_retries: int = 3
    create_bucket: bool = False
    environment_file: str | None = None


@dataclass(slots=True)
class StorageConfig:
    url: str | None = None
    # One store operation (read, write, flush) that takes longer fails with
    # EIO: SlateDB retries a full or read-only disk forever. 0: no bound.
    timeout_ms: int = 12_000
    # Reads get a shorter bound of their own: a client waiting on a READ is
    # usually a filesystem or an application blocked on it, and during an
    # outage it should see EIO in seconds, not after every write retry.
    read_timeout_ms: int = 4_000
    # Encrypt every value at rest with the key in this file (docs/security.md).
    # The path is configuration, the key is not: it is read at start only.
    encryption_key_file: str | None = None
    s3: S3Config = field(default_factory=S3Config)


TLS_MODES = ("require", "allow", "off")


@dataclass(slots=True)
class TlsConfig:
    """``[nbd.tls]``: x509 certificates for NBD_OPT_STARTTLS (portalbd/nbd/tls.py)."""

    # require: only TLS clients; allow: TLS or plain; off: no STARTTLS.
    # Unset: require when a certificate is configured, else off.
    mode: str | None = None
    certificate: str | None = None  # PEM; the chain may follow the server's certificate
    key: str | None = None  # PEM private key (read by the ssl module, never logged)
    ca: str | None = None  # when set, clients must present a certificate it signed

    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode.lower()
        return "require" if self.certificate else "off"


@dataclass(slots=True)
class NbdConfig:
    address: str = "127.0.0.1:10809"
    socket: str | None = None
    export_name: str = "portalbd"
    max_connections: int = 64
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(slots=True)
class LsmConfig:
    flush_interval_ms: int | None = 100
    l0_sst_size_bytes: int | None = 64 * MIB
    l0_max_ssts: int | None = None
    max_unflushed_bytes: int | None = 128 * MIB
    filter_bits_per_key: int | None = None
    block_cache_size_bytes: int | None = 32 * MIB
    # Values are LZ4-compressed in Python before they cross the binding
    # (store/envelope.py); compressing SST blocks again costs CPU on data
    # that is already compressed or incompressible.
    compression_codec: str | None = "none"
    # bytes, or SlateDB's name for the size ("Block64Kib"), as the original wrote it.
    # 64 KiB, not SlateDB's 4 KiB: a 4 KiB page delta plus its key overflows a
    # 4 KiB SST block, so every delta cost a block of its own, and a scan pays
    # per block. Scanning 16 blocks with 10 deltas each took 14.6 ms of CPU
    # with 4 KiB SST blocks, 4.6-5.3 ms with 64 KiB (2.5-3.0 ms with no
    # deltas either way): docs/data-plane.md, "Reads".
    sst_block_size: int | str | None = 64 * 1024
    # SlateDB's cache of object-store parts on local disk: survives restarts,
    # so reads from S3 that were served once come from the disk after. On
    # for S3 disks, under paths.object_cache_root() unless a directory is
    # given; object_cache_bytes = 0 turns it off.
    object_cache_dir: str | None = None
    object_cache_bytes: int = 16 * GIB

    def sst_block_bytes(self) -> int | None:
        """The SST block size in bytes, whichever form the file used (validated)."""
        return sst_block_bytes(self.sst_block_size)


@dataclass(slots=True)
class RecordConfig:
    path: str | None = None
    workload: str = "unnamed"


@dataclass(slots=True)
class MetricsConfig:
    address: str | None = None


@dataclass(slots=True)
class SnapshotsConfig:
    """``[snapshots]``: take snapshots on a schedule and prune old ones (docs/snapshots.md).

    Off while ``every`` is unset. Only the scheduler's own snapshots
    (``auto-...``) are ever pruned (retention.py).
    """

    every: str | None = None  # "30s", "15m", "1h", "1d": one number, one unit
    keep: int | None = None  # the newest N scheduled snapshots
    keep_daily: int | None = None  # plus the newest of each of the last N days
    keep_weekly: int | None = None  # plus the newest of each of the last N ISO weeks

    def every_seconds(self) -> int | None:
        """The interval in seconds (validated), or None with no schedule."""
        return None if self.every is None else parse_duration(self.every)


@dataclass(slots=True)
class Config:
    socket: str | None = None
    log_level: str = "info"
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    nbd: NbdConfig = field(default_factory=NbdConfig)
    lsm: LsmConfig = field(default_factory=LsmConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)


COMPRESSION_CODECS = ("none", "lz4", "snappy", "zlib", "zstd")
SST_BLOCK_SIZES = tuple(1024 << i for i in range(7))  # 1 KiB .. 64 KiB
# SlateDB's serde names for them, which the original portalbd's files use
SST_BLOCK_NAMES = {f"block{size // 1024}kib": size for size in SST_BLOCK_SIZES}


def sst_block_bytes(value: int | str | None) -> int | None:
    """``65536`` or ``"Block64Kib"`` (any case) to bytes; ValueError for anything else."""
    if value is None or isinstance(value, int):
        return value
    try:
        return SST_BLOCK_NAMES[value.lower()]
    except KeyError:
        raise ValueError(value) from None


LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1024 * 1024


# --- loading ---------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean"
    if tp is float:
        return "a number"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check one TOML value against a declared type (None never comes from TOML)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) > 1:
            for option in options:
                with contextlib.suppress(ConfigError):
                    return _coerce(value, option, where)
            expected = " or ".join(_type_name(o) for o in options)
            raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")
        tp = options[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {_describe(value)}")
        return _build(typing.cast(type, tp), value, where)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    declared = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in declared:
            known = ", ".join(sorted(declared))
            raise ConfigError(f"{path}: unknown key (known here: {known})")
        kwargs[key] = _coerce(value, declared[key], path)
    return cls(**kwargs)


def parse(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a validated :class:`Config`."""
    try:
        document = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        config: Config = _build(Config, document, "")
        _imply_unflushed(config, document.get("lsm", {}))
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _imply_unflushed(config: Config, lsm_table: dict[str, Any]) -> None:
    """An L0 table larger than our default write budget, with no budget set, raises it.

    The original portalbd left ``max_unflushed_bytes`` to SlateDB (1 GiB), so
    its files set ``l0_sst_size_bytes`` alone, up to 256 MiB (its default):
    a memtable must fit under the budget, so the budget becomes twice the L0
    size instead of the file being refused. A budget the file sets is checked
    as it is.
    """
    lsm = config.lsm
    if "max_unflushed_bytes" in lsm_table or lsm.l0_sst_size_bytes is None:
        return
    if lsm.max_unflushed_bytes and lsm.max_unflushed_bytes <= lsm.l0_sst_size_bytes:
        lsm.max_unflushed_bytes = 2 * lsm.l0_sst_size_bytes


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    return parse(text, str(path))


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate(config: Config) -> None:
    """Check values that types alone cannot: ranges, choices, relations."""
    device = config.device
    if device.disk_size_gb is not None and device.disk_size_gb <= 0:
        raise ConfigError("device.disk_size_gb: must be at least 1")
    if device.size_bytes is not None and device.size_bytes <= 0:
        raise ConfigError("device.size_bytes: must be positive")
    if not _power_of_two(device.block_size) or not (
        MIN_BLOCK_SIZE <= device.block_size <= MAX_BLOCK_SIZE
    ):
        raise ConfigError(
            f"device.block_size: must be a power of two from {MIN_BLOCK_SIZE} to "
            f"{MAX_BLOCK_SIZE}, got {device.block_size}"
        )
    if device.snapshot is not None and not device.read_only:
        raise ConfigError(
            "device.snapshot: serving a snapshot needs device.read_only (--read-only); "
            "to make the disk a snapshot again, restore it"
        )
    if device.cache_bytes < 0:
        raise ConfigError("device.cache_bytes: must not be negative")
    if device.dirty_bytes < 4 * device.block_size:
        raise ConfigError(
            f"device.dirty_bytes: must hold at least 4 blocks ({4 * device.block_size} bytes)"
        )
    if config.storage.timeout_ms < 0:
        raise ConfigError("storage.timeout_ms: must not be negative (0 means no bound)")
    if config.storage.read_timeout_ms < 0:
        raise ConfigError("storage.read_timeout_ms: must not be negative (0 means no bound)")
    if config.storage.encryption_key_file == "":
        raise ConfigError("storage.encryption_key_file: empty; give a path or leave it unset")
    if not 0 <= device.io_threads <= 64:
        raise ConfigError(f"device.io_threads: must be from 0 to 64, got {device.io_threads}")
    if config.nbd.max_connections < 1:
        raise ConfigError("nbd.max_connections: must be at least 1")
    if not config.nbd.address and not config.nbd.socket:
        raise ConfigError("nbd: set address, socket or both; with neither nothing can connect")
    if config.nbd.address:
        parse_address(config.nbd.address, "nbd.address")
    if config.metrics.address:
        parse_address(config.metrics.address, "metrics.address")
    validate_tls(config.nbd.tls)
    validate_snapshots(config.snapshots, read_only=device.read_only)
    lsm = config.lsm
    if lsm.compression_codec is not None and lsm.compression_codec.lower() not in (
        COMPRESSION_CODECS
    ):
        raise ConfigError(
            f"lsm.compression_codec: must be one of {', '.join(COMPRESSION_CODECS)}, "
            f"got {lsm.compression_codec!r}"
        )
    try:
        block_bytes = sst_block_bytes(lsm.sst_block_size)
    except ValueError:
        block_bytes = -1
    if block_bytes is not None and block_bytes not in SST_BLOCK_SIZES:
        raise ConfigError(
            "lsm.sst_block_size: must be one of "
            + ", ".join(str(s) for s in SST_BLOCK_SIZES)
            + " (bytes) or SlateDB's name for one ("
            + ", ".join(f"Block{s // 1024}Kib" for s in SST_BLOCK_SIZES)
            + f"), got {lsm.sst_block_size!r}"
        )
    if lsm.object_cache_dir is not None and not Path(lsm.object_cache_dir).is_absolute():
        raise ConfigError(
            f"lsm.object_cache_dir: must be an absolute path, got {lsm.object_cache_dir!r}"
        )
    if lsm.object_cache_bytes < 0:
        raise ConfigError("lsm.object_cache_bytes: must not be negative (0 turns the cache off)")
    for name in ("flush_interval_ms", "l0_sst_size_bytes", "max_unflushed_bytes"):
        value = getattr(lsm, name)
        if value is not None and value < 0:
            raise ConfigError(f"lsm.{name}: must not be negative")
    unflushed, l0_size = lsm.max_unflushed_bytes, lsm.l0_sst_size_bytes
    if unflushed and l0_size is not None and unflushed <= l0_size:
        # SlateDB refuses it at open with a less direct message
        raise ConfigError(
            f"lsm.max_unflushed_bytes ({unflushed}) must be greater than "
            f"lsm.l0_sst_size_bytes ({l0_size}): a memtable fills one L0 table"
        )
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
    name = config.instance.name
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(
            f"instance.name: {name!r} must be letters, digits, '-', '_' or '.' (not leading)"
        )
    if config.storage.url:
        from portalbd.store.location import parse_storage_url

        try:
            parse_storage_url(config.storage.url)
        except ValueError as exc:
            raise ConfigError(f"storage.url: {exc}") from None


def validate_snapshots(snapshots: SnapshotsConfig, *, read_only: bool) -> None:
    """``[snapshots]``: an interval, how many to keep, and a disk that can take them."""
    tiers = ("keep", "keep_daily", "keep_weekly")
    if snapshots.every is None:
        for key in tiers:
            if getattr(snapshots, key) is not None:
                raise ConfigError(
                    f"snapshots.{key}: set without snapshots.every "
                    '(how often to take one, e.g. every = "15m")'
                )
        return
    try:
        every = parse_duration(snapshots.every)
    except ValueError:
        raise ConfigError(
            f"snapshots.every: expected a whole number and a unit, s, m, h or d "
            f'(e.g. "30s", "15m", "1h", "1d"), got {snapshots.every!r}'
        ) from None
    if every > 7 * 86400:
        raise ConfigError(f"snapshots.every: at most 7d, got {snapshots.every!r}")
    if snapshots.keep is None:
        raise ConfigError(
            "snapshots.keep: missing; say how many scheduled snapshots to keep (e.g. keep = 96)"
        )
    if snapshots.keep < 1:
        raise ConfigError(
            f"snapshots.keep: must be at least 1 (the newest is always kept), got {snapshots.keep}"
        )
    for key in ("keep_daily", "keep_weekly"):
        value = getattr(snapshots, key)
        if value is not None and value < 0:
            raise ConfigError(f"snapshots.{key}: must not be negative, got {value}")
    if read_only:
        raise ConfigError(
            "snapshots.every: a read-only replica cannot take snapshots; "
            "schedule them on the daemon that writes the disk"
        )


def validate_tls(tls: TlsConfig) -> None:
    """Which ``[nbd.tls]`` keys go together (the files are read at start)."""
    if tls.mode is not None and tls.mode.lower() not in TLS_MODES:
        raise ConfigError(f"nbd.tls.mode: must be one of {', '.join(TLS_MODES)}, got {tls.mode!r}")
    if tls.key and not tls.certificate:
        raise ConfigError("nbd.tls.key: set without nbd.tls.certificate (the key's certificate)")
    if tls.ca and not tls.certificate:
        raise ConfigError(
            "nbd.tls.ca: checking client certificates needs the server's own "
            "nbd.tls.certificate and nbd.tls.key"
        )
    if tls.certificate and not tls.key:
        raise ConfigError("nbd.tls.certificate: set without nbd.tls.key (its private key)")
    mode = tls.effective_mode()
    if mode != "off" and not tls.certificate:
        raise ConfigError(
            f"nbd.tls.mode = {mode!r} needs nbd.tls.certificate and nbd.tls.key "
            "(--tls-certificate, --tls-key)"
        )


def parse_address(text: str, where: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) and check the port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{where}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} out of range")
    return host, port


# --- overrides and rendering ------------------------------------------------


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Apply one override such as ``device.block_size`` (from a CLI flag)."""
    target: Any = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


def to_toml(config: Config) -> str:
    """Render the effective configuration; unset optional keys are commented."""
    document = tomlkit.document()
    document.add(tomlkit.comment("portalbd effective configuration"))

    def fill(container: Any, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            if value is None:
                container.add(tomlkit.comment(f"{f.name} = (unset)"))
            else:
                container.add(f.name, value)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                table = tomlkit.table()
                fill(table, value)
                container.add(f.name, table)

    fill(document, config)
    return tomlkit.dumps(document)
