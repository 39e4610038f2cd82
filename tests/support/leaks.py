"""Looking for client data in a store directory (encryption at rest tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RUN = 64  # no run of this many bytes of client data may appear in the store
CHUNK = RUN // 2  # every 64-byte run of the data contains a whole aligned 32-byte chunk


def leaked_runs(data: bytes, root: Path) -> list[str]:
    """Files under ``root`` holding any 64-byte run of ``data``, exactly.

    Every 64-byte window of ``data`` contains one of its 32-byte chunks at a
    multiple of 32, so it is enough to look for those: their first 8 bytes
    at every offset of every file (numpy, 8 alignments, a sorted search), then a
    full compare.
    """
    chunks = {data[i : i + CHUNK] for i in range(0, len(data) - CHUNK + 1, CHUNK)}
    prefixes = np.sort(np.frombuffer(b"".join(c[:8] for c in chunks), dtype="<u8"))
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content = path.read_bytes()
        for align in range(8):
            usable = (len(content) - align) // 8 * 8
            if usable <= 0:
                continue
            words = np.frombuffer(content, dtype="<u8", count=usable // 8, offset=align)
            nearest = prefixes[np.minimum(np.searchsorted(prefixes, words), len(prefixes) - 1)]
            for index in np.nonzero(nearest == words)[0]:
                at = align + 8 * int(index)
                if content[at : at + CHUNK] in chunks:
                    found.append(f"{path.relative_to(root)}@{at}")
    return found
