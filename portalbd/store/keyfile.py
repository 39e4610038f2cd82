"""Reading the operator's encryption key: 32 raw bytes, or 64 hex digits.

Both are accepted because both are what the usual tools make: ``head -c 32
/dev/urandom`` writes raw bytes, ``openssl rand -hex 32`` (and a Kubernetes
secret, whose values are text) hex. Hex may be upper or lower case and end
in one newline; anything else is refused with what was found, never
stretched, hashed or padded into a key, so a truncated or wrong file cannot
silently become a different key. The key itself never appears in a message.
"""

from __future__ import annotations

import string
from pathlib import Path

from portalbd.store.sealing import KEY_SIZE

HEX_SIZE = 2 * KEY_SIZE
FORMAT_HELP = (
    f"an encryption key file holds {KEY_SIZE} raw bytes or {HEX_SIZE} hex digits "
    "(make one with: openssl rand -hex 32 > FILE)"
)


class KeyFileError(ValueError):
    """The key file cannot be used; the message says why (never the key)."""


def parse_key(data: bytes) -> bytes:
    """The 32-byte key a key file's contents spell."""
    if len(data) == KEY_SIZE:
        return data
    text = data[:-1] if data.endswith(b"\n") else data
    if text.endswith(b"\r"):
        text = text[:-1]
    if len(text) == HEX_SIZE:
        try:
            decoded = text.decode("ascii")
        except UnicodeDecodeError:
            decoded = ""
        if decoded and all(c in string.hexdigits for c in decoded):
            return bytes.fromhex(decoded)
        raise KeyFileError(
            f"it holds {HEX_SIZE} characters that are not all hex digits; {FORMAT_HELP}"
        )
    raise KeyFileError(f"it holds {len(data)} bytes; {FORMAT_HELP}")


def read_key_file(path: Path) -> bytes:
    """Read and parse a key file (blocking: call it off the event loop)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read it: {exc.strerror}") from exc
    return parse_key(data)
