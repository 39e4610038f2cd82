"""The one module that owns the SlateDB binding: its import, its patch, its errors.

The generated binding must be patched (``uniffi_patch``) before anything
uses it, and its errors must become portalbd's own, with messages meant for
an operator. Every other module takes ``sdb`` and the error classes from
here, so the patch cannot be skipped by importing the binding first, and
nothing below ``store/`` needs to import ``slate`` just for an error type.
"""

from __future__ import annotations

from portalbd.store import uniffi_patch

uniffi_patch.apply()

import slatedb.uniffi as sdb  # noqa: E402  (the patch must come first)

__all__ = ["StoreClosed", "StoreError", "StoreFenced", "sdb", "translate_error"]


class StoreError(Exception):
    """A storage operation failed; the message is meant for the operator."""


class StoreFenced(StoreError):
    """Another writer opened the same database and fenced this one out."""


class StoreClosed(StoreError):
    """The database was closed (shutdown or restore swapped it)."""


def translate_error(exc: BaseException, what: str) -> StoreError:
    """Turn a binding error into one of ours with a readable message."""
    if isinstance(exc, sdb.Error.Closed):
        reason = getattr(exc, "reason", None)
        if reason == sdb.CloseReason.FENCED:
            return StoreFenced(
                f"{what}: another portalbd opened this storage and fenced this daemon out"
            )
        return StoreClosed(f"{what}: database closed ({reason})")
    message = getattr(exc, "message", None) or str(exc)
    return StoreError(f"{what}: {message}")
