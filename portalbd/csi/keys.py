"""Encrypted CSI volumes: the StorageClass parameter and the NodeStage secret.

A StorageClass with ``encrypted: "true"`` makes volumes whose daemon must be
given a key; Kubernetes hands it to NodeStageVolume from the secret that
``csi.storage.k8s.io/node-stage-secret-name`` / ``-namespace`` name, under
:data:`SECRET_KEY`, as 64 hex digits. The node writes it to a file only its
owner can read, in the volume's state directory, and starts the daemon with
``--encryption-key-file``; unstaging removes the file.

The parameter is recorded with the volume, so the node refuses to stage an
encrypted volume without its secret: the daemon would otherwise create a
fresh volume as a plain disk. A key for a volume not marked encrypted is
refused too. Whether the key is the right one is the daemon's check (the key
check in the device metadata), made at every stage.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from portalbd.csi import errors as e
from portalbd.store.keyfile import KeyFileError, parse_key

PARAMETER = "encrypted"
SECRET_KEY = "encryptionKey"
KEY_FILE = "encryption.key"
SECRET_HELP = (
    "name a Secret holding it in the StorageClass "
    "(csi.storage.k8s.io/node-stage-secret-name and -namespace)"
)


def check_parameter(value: str) -> bool:
    """Whether the ``encrypted`` StorageClass parameter asks for encryption."""
    if value not in ("true", "false"):
        raise e.invalid(f'parameter {PARAMETER}={value!r}: use "true" or "false"')
    return value == "true"


def is_encrypted(parameters: Mapping[str, str]) -> bool:
    return parameters.get(PARAMETER) == "true"


def stage_key(
    state_dir: Path, volume_id: str, encrypted: bool, secrets: Mapping[str, str]
) -> Path | None:
    """The key file for the volume's daemon (None for a plain volume).

    Blocking (small file I/O): call it off the event loop.
    """
    text = secrets.get(SECRET_KEY)
    path = state_dir / KEY_FILE
    if not encrypted:
        if text is not None:
            raise e.invalid(
                f"volume {volume_id} is not encrypted, but NodeStageVolume got the secret "
                f"{SECRET_KEY}; refusing to guess which is meant"
            )
        forget_key(state_dir)
        return None
    if text is None:
        raise e.invalid(
            f"volume {volume_id} is encrypted: NodeStageVolume needs its key in the "
            f"secret {SECRET_KEY}; {SECRET_HELP}"
        )
    try:
        key = parse_key(text.encode())
    except KeyFileError as exc:
        raise e.invalid(f"secret {SECRET_KEY} of volume {volume_id}: {exc}") from None
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, key.hex().encode())
    finally:
        os.close(fd)
    return path


def forget_key(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / KEY_FILE).unlink()
