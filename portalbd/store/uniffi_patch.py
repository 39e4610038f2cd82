"""Make the SlateDB binding copy byte arguments with one memmove.

The UniFFI-generated Python code (slatedb 0.17.0) lowers every ``bytes``
argument into the Rust buffer with a Python ``for`` loop, one byte per
iteration. A 64 KiB put then costs about 10 ms of pure interpreter time,
which caps writes at a few MB/s. We replace the two offending methods of
``_UniffiRustBufferBuilder`` with versions that reserve the space and copy
with a single ``ctypes.memmove``. The patch is guarded by a version check
and by a check that the class still has the shape we expect, so a new
binding release fails loudly instead of silently running slow (or wrong).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import struct
from typing import Any

PATCHED_VERSIONS = frozenset({"0.17.0"})


class BindingPatchError(RuntimeError):
    """The installed SlateDB binding does not look like the one we patch."""


_applied = False


def _generated_module() -> Any:
    import slatedb.uniffi

    return slatedb.uniffi._generated


def apply() -> None:
    """Install the fast copy routines; safe to call more than once."""
    global _applied
    if _applied:
        return
    version = importlib.metadata.version("slatedb")
    if version not in PATCHED_VERSIONS:
        raise BindingPatchError(
            f"slatedb {version} is not a version portalbd has been checked against "
            f"(known: {', '.join(sorted(PATCHED_VERSIONS))}); pin slatedb==0.17.0"
        )
    module = _generated_module()
    builder = getattr(module, "_UniffiRustBufferBuilder", None)
    if builder is None or not all(hasattr(builder, n) for n in ("_reserve", "write", "_pack_into")):
        raise BindingPatchError("slatedb binding changed shape: _UniffiRustBufferBuilder not found")

    def write(self: Any, value: Any) -> None:
        size = len(value)
        if size == 0:
            return
        if not isinstance(value, bytes):
            value = bytes(value)
        with self._reserve(size):
            base = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value or 0
            ctypes.memmove(base + self.rbuf.len, value, size)

    def pack_into(self: Any, size: int, fmt: str, value: Any) -> None:
        packed = struct.pack(fmt, value)
        with self._reserve(size):
            base = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value or 0
            ctypes.memmove(base + self.rbuf.len, packed, size)

    rust_buffer = module._UniffiRustBuffer
    bytes_converter = getattr(module, "_UniffiFfiConverterBytes", None)
    if bytes_converter is None or not hasattr(rust_buffer, "alloc"):
        raise BindingPatchError("slatedb binding changed shape: bytes converter not found")
    length_prefix = struct.Struct(">i")

    def lower_bytes(value: Any) -> Any:
        # One allocation of the exact size instead of alloc(16) + reserve:
        # every call into the library costs several microseconds.
        size = len(value)
        if not isinstance(value, bytes):
            value = bytes(value)
        rbuf = rust_buffer.alloc(size + 4)
        base = ctypes.cast(rbuf.data, ctypes.c_void_p).value or 0
        ctypes.memmove(base, length_prefix.pack(size), 4)
        if size:
            ctypes.memmove(base + 4, value, size)
        rbuf.len = size + 4
        return rbuf

    builder.write = write
    builder._pack_into = pack_into
    bytes_converter.lower = staticmethod(lower_bytes)
    builder._portalbd_patched = True
    _applied = True


def is_applied() -> bool:
    """True when the binding's buffer builder carries our fast copy."""
    module = _generated_module()
    return bool(getattr(module._UniffiRustBufferBuilder, "_portalbd_patched", False))
