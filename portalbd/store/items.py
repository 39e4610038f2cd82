"""What one write batch item carries: a value, a hole, or a delete.

Pure and import-free, so the layout code (``pages.py``) and the store
(``slate.py``) share one vocabulary without the layout importing the binding.
"""

from __future__ import annotations


class Tombstone:
    """Marks a key to delete inside a batch whose values are encoded.

    Without an encoder ``None`` deletes; with one ``None`` is a hole that
    is stored, so a drain that also removes keys says so with
    :data:`DELETE`.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETE"


DELETE = Tombstone()
