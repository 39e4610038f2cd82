"""Encryption at rest: the keys of one encrypted disk and the AEAD over its values.

One :class:`Sealer` per open encrypted disk. Every key it uses is derived
with HKDF-SHA256 from the operator's 32-byte master key, salted with the
disk's random 16-byte id (recorded in the device metadata), so two disks
under one master key share no derived key:

* the *key check* recorded in the metadata, which tells a wrong key from
  the right one at open without decrypting anything;
* the key of the metadata MAC, so the recorded geometry, epoch and format
  cannot be altered unnoticed;
* one AES-256-GCM key per *session*: a random 16-byte salt drawn whenever a
  sealer is made (every open of the disk) and again after
  :data:`SESSION_VALUES` values. Each sealed value carries its session salt,
  and its 96-bit nonce is that session's counter, so within a key a nonce is
  never repeated, by construction rather than by chance. Two sessions share
  a key only if two random 128-bit salts collide.

Why sessions rather than one key per disk with random nonces: AES-GCM's
random-nonce limit (2^32 values per key) is about 16 TiB of 4 KiB writes, a
lifetime a busy disk reaches. Why not a counter under one per-disk key: a
snapshot, a restore or a clone continues the disk's sequence numbers on two
branches that share its key, so any nonce derived from them would repeat.
A fresh salt per session is unique on every branch. (AES-GCM-SIV, which
survives a repeated nonce, ran 5x slower than AES-GCM in the OpenSSL here.)

The associated data of a value binds it to the disk (its id), to its store
key (the block, or block and page) and to its envelope header (codec and
sequence), so a value moved to another block or another disk, or given
another header, fails authentication.

Pure computation only: no I/O, so it can be tested and fuzzed alone.
"""

from __future__ import annotations

import hmac
import itertools
import os
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
DISK_ID_SIZE = 16
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = SALT_SIZE + NONCE_SIZE + TAG_SIZE  # what sealing adds to a payload
CIPHER = "aes-256-gcm"

# A session's key encrypts at most this many values (each at most 1 MiB, so
# at most 2^52 bytes): far inside AES-GCM's limits for one key.
SESSION_VALUES = 1 << 32
_SESSION_KEYS = 1024  # session keys kept for reading; a miss costs one HKDF

_INFO_CHECK = b"portalbd/v1 key check"
_INFO_META = b"portalbd/v1 metadata mac"
_INFO_VALUES = b"portalbd/v1 values:"


class SealError(ValueError):
    """A sealed value does not authenticate: altered, moved, or another key."""


def _derive(master: bytes, disk_id: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=disk_id, info=info).derive(master)


def key_check(master: bytes, disk_id: bytes) -> str:
    """What the metadata records to recognise the key (hex; reveals nothing of it)."""
    return _derive(master, disk_id, _INFO_CHECK, 16).hex()


def new_disk_id() -> bytes:
    return os.urandom(DISK_ID_SIZE)


class Sealer:
    """The AEAD of one encrypted disk, shared by the threads that build batches."""

    def __init__(
        self,
        master: bytes,
        disk_id: bytes,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        session_values: int = SESSION_VALUES,
    ) -> None:
        if len(master) != KEY_SIZE:
            raise ValueError(f"an encryption key is {KEY_SIZE} bytes, not {len(master)}")
        if len(disk_id) != DISK_ID_SIZE:
            raise ValueError(f"a disk id is {DISK_ID_SIZE} bytes, not {len(disk_id)}")
        self._master = master
        self.disk_id = disk_id
        self.key_check = key_check(master, disk_id)
        self._meta_key = _derive(master, disk_id, _INFO_META)
        self._random = random_bytes
        self._session_values = session_values
        self._lock = threading.Lock()
        self._keys: dict[bytes, AESGCM] = {}
        self._new_session()

    def _new_session(self) -> None:
        self._salt = self._random(SALT_SIZE)
        self._aead = self._session_key(self._salt)
        self._counter = itertools.count()

    def _session_key(self, salt: bytes) -> AESGCM:
        aead = self._keys.get(salt)
        if aead is None:
            if len(self._keys) >= _SESSION_KEYS:
                self._keys.clear()  # rare: only a disk opened that often
            aead = AESGCM(_derive(self._master, self.disk_id, _INFO_VALUES + salt))
            self._keys[salt] = aead
        return aead

    def _next_nonce(self) -> tuple[bytes, AESGCM, bytes]:
        with self._lock:
            n = next(self._counter)
            if n >= self._session_values:
                self._new_session()
                n = next(self._counter)
            return self._salt, self._aead, n.to_bytes(NONCE_SIZE, "big")

    def _aad(self, head: bytes, key: bytes) -> bytes:
        return self.disk_id + head + key

    def seal(self, head: bytes, key: bytes, body: bytes | memoryview) -> bytes:
        """``head`` + salt + nonce + ciphertext + tag of ``body``, bound to ``key``."""
        salt, aead, nonce = self._next_nonce()
        return head + salt + nonce + aead.encrypt(nonce, body, self._aad(head, key))

    def unseal(self, head: bytes, key: bytes, sealed: bytes | memoryview) -> bytes:
        """The body of a value sealed by :meth:`seal` (``sealed`` follows the header)."""
        if len(sealed) < OVERHEAD:
            raise SealError(f"sealed value of {len(sealed)} bytes is shorter than its seal")
        view = memoryview(sealed)
        salt = bytes(view[:SALT_SIZE])
        nonce = bytes(view[SALT_SIZE : SALT_SIZE + NONCE_SIZE])
        with self._lock:
            aead = self._session_key(salt)
        try:
            return aead.decrypt(nonce, view[SALT_SIZE + NONCE_SIZE :], self._aad(head, key))
        except InvalidTag:
            raise SealError(
                f"stored value under key {key.hex()} fails authentication "
                "(altered, moved from another block or disk, or sealed with another key)"
            ) from None

    def mac(self, document: bytes) -> str:
        """The metadata's authentication code (hex)."""
        return hmac.new(self._meta_key, document, "sha256").hexdigest()

    def mac_matches(self, document: bytes, mac: str) -> bool:
        return hmac.compare_digest(self.mac(document), mac)
