"""A RAM disk as an nbdkit Python plugin: the reference peer for core_fio.py.

It is what a straightforward Python NBD server costs when nbdkit's C code
does the protocol: every request is one call into this module.

    nbdkit -f -p PORT python benchmarks/nbdkit_ramdisk.py size=1073741824
"""

from __future__ import annotations

from typing import Any

import nbdkit  # type: ignore[import-not-found]  # exists only inside nbdkit

API_VERSION = 2

_size = 1 << 30
_disk = bytearray()


def config(key: str, value: str) -> None:
    global _size
    if key != "size":
        raise RuntimeError(f"unknown parameter {key}")
    _size = int(value)


def config_complete() -> None:
    global _disk
    _disk = bytearray(_size)  # zero pages: the kernel maps them lazily


def thread_model() -> int:
    thread_model_parallel: int = nbdkit.THREAD_MODEL_PARALLEL
    return thread_model_parallel


def open(readonly: bool) -> int:  # the name nbdkit calls
    return 1


def get_size(h: Any) -> int:
    return len(_disk)


def can_multi_conn(h: Any) -> bool:
    return True


def can_flush(h: Any) -> bool:
    return True


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    buf[:] = _disk[offset : offset + len(buf)]


def pwrite(h: Any, buf: Any, offset: int, flags: int) -> None:
    _disk[offset : offset + len(buf)] = buf


def flush(h: Any, flags: int) -> None:
    pass
