"""Storage URLs: where an instance's databases live.

``memory://`` (or no URL) keeps everything in RAM for the life of the
process; ``file:///abs/dir`` uses a local directory; ``s3://bucket/prefix``
any S3-compatible bucket. SlateDB wants the object store's root URL and the
path of each database inside it separately, so we split them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

StorageKind = Literal["memory", "file", "s3"]

# Said at start (log), in status and the TUI: a new user's first disk is often
# a memory one, and nothing else tells them it will be gone after a restart.
EPHEMERAL_WARNING = (
    "storage is memory://: the disk lives only in this process's RAM and everything "
    "written to it is lost when portalbd exits; give --storage-url file:///abs/dir "
    "or s3://bucket/prefix to keep it"
)


@dataclass(frozen=True, slots=True)
class StorageLocation:
    kind: StorageKind
    store_url: str  # what ObjectStore.resolve() gets
    prefix: str  # path inside the object store under which the instance lives
    display: str  # the URL as the user wrote it (never carries secrets)

    @property
    def ephemeral(self) -> bool:
        """True when nothing outlives the process (memory storage)."""
        return self.kind == "memory"

    def path(self, *parts: str) -> str:
        """A database path inside the store, under the instance prefix."""
        joined = "/".join(p.strip("/") for p in parts if p)
        return f"{self.prefix}/{joined}" if self.prefix else joined


def parse_storage_url(url: str | None) -> StorageLocation:
    """Parse and check a storage URL; ValueError says what is wrong."""
    if url is None or url in ("", "memory://", "memory:///", "memory"):
        return StorageLocation("memory", "memory:///", "portalbd", "memory://")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file URLs need an absolute path: file:///abs/dir")
        path = parts.path.rstrip("/")
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: file URLs need an absolute path: file:///abs/dir")
        # SlateDB resolves the filesystem root; the directory goes into the
        # database paths instead ("provide path to builder").
        return StorageLocation("file", "file:///", path.lstrip("/"), url)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket or "@" in bucket:
            raise ValueError(f"{url!r}: S3 URLs look like s3://bucket/prefix")
        return StorageLocation("s3", f"s3://{bucket}", parts.path.strip("/"), url)
    if not parts.scheme:
        raise ValueError(
            f"{url!r} is not a URL; use file:///abs/dir, s3://bucket/prefix or memory://"
        )
    raise ValueError(
        f"unsupported storage scheme {parts.scheme!r} in {url!r}; "
        "use file:///abs/dir, s3://bucket/prefix or memory://"
    )
