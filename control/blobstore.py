"""The content-addressed byte store behind BlobService, on the control plane's disk.

Layout under the root directory (``SPOOL_BLOB_DIR``, default ``<data_dir>/blobs``)::

    objects/ab/abcdef…     finished content, one file per sha256, shared by tenants
    partial/<tenant-key>/<sha256>
                           an unfinished upload of one tenant (resumable)

Content is stored once per sha256: a tenant's upload goes to its own partial
file and, once its hash is verified, is renamed into ``objects/`` (or dropped
if another tenant already stored the same bytes). Which tenant may read what
is recorded in Postgres (`control.store.blobs`), never inferred from disk.

Every method here does blocking file I/O; async callers run them in a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: largest chunk an Upload may carry and the chunk size of Download
CHUNK_BYTES = 1024 * 1024

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_URI_PREFIX = "blob:sha256:"


def is_sha256(value: str) -> bool:
    """True for a lower-case 64-digit hex string."""
    return bool(_SHA256_RE.fullmatch(value))


def blob_uri(sha256: str) -> str:
    """The URI of a blob: ``blob:sha256:<hex>``."""
    return f"{_URI_PREFIX}{sha256}"


def parse_blob_uri(uri: str) -> str | None:
    """The sha256 of a ``blob:sha256:<hex>`` URI (hex lower-cased), or None if malformed."""
    if not uri.startswith(_URI_PREFIX):
        return None
    sha = uri[len(_URI_PREFIX) :].lower()
    return sha if is_sha256(sha) else None


def _tenant_key(tenant: str) -> str:
    # Tenant names are free text; a hash keeps the directory name safe and short.
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


class PartialUpload:
    """An open, append-only partial file with a running sha256 of everything in it."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self._hash = hashlib.sha256()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: the file size on disk is always what was received, which is
        # what Stat reports as uploaded_bytes after a broken stream.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "r+b", buffering=0)
        try:
            self._file.truncate(offset)
            # Resuming: the running hash must cover the bytes already there.
            self._file.seek(0)
            remaining = offset
            while remaining:
                block = self._file.read(min(CHUNK_BYTES, remaining))
                if not block:
                    raise OSError(f"partial upload {path} is shorter than {offset} bytes")
                self._hash.update(block)
                remaining -= len(block)
            self._file.seek(offset)
        except BaseException:
            self._file.close()
            raise
        self.size = offset

    def write(self, chunk: bytes) -> None:
        """Append `chunk` (fully written before returning)."""
        view = memoryview(chunk)
        while view:
            n = self._file.write(view)
            view = view[n:]
        self._hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        """The sha256 of everything written so far."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Close the file (idempotent); the partial stays on disk."""
        self._file.close()


class BlobStore:
    """Content-addressed files on one local directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.partials = self.root / "partial"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.partials.mkdir(parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        """Where finished content with this hash lives."""
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.objects / sha256[:2] / sha256

    def partial_path(self, tenant: str, sha256: str) -> Path:
        """Where `tenant`'s unfinished upload of this hash lives."""
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.partials / _tenant_key(tenant) / sha256

    # -- uploads --------------------------------------------------------------
    def partial_size(self, tenant: str, sha256: str) -> int:
        """Bytes of `tenant`'s unfinished upload on disk (0 if none)."""
        try:
            return self.partial_path(tenant, sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, tenant: str, sha256: str, offset: int) -> PartialUpload:
        """Open the partial file for appending at `offset` (later bytes are dropped)."""
        return PartialUpload(self.partial_path(tenant, sha256), offset)

    def discard_partial(self, tenant: str, sha256: str) -> None:
        """Delete `tenant`'s unfinished upload, if any."""
        self.partial_path(tenant, sha256).unlink(missing_ok=True)

    def commit_partial(self, tenant: str, sha256: str) -> None:
        """Move a verified partial into ``objects/`` (or drop it if the content is there)."""
        src = self.partial_path(tenant, sha256)
        dst = self.object_path(sha256)
        if dst.exists():
            src.unlink(missing_ok=True)
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o400)
        os.replace(src, dst)

    # -- content --------------------------------------------------------------
    def has_object(self, sha256: str) -> bool:
        """True if finished content with this hash is on disk."""
        return self.object_path(sha256).is_file()

    def delete_object(self, sha256: str) -> None:
        """Delete finished content (callers check no tenant still references it)."""
        self.object_path(sha256).unlink(missing_ok=True)

    def open_object(self, sha256: str) -> BinaryIO:
        """Open finished content for reading (FileNotFoundError if it is not on disk)."""
        return open(self.object_path(sha256), "rb")

    def read_range(
        self, sha256: str, offset: int = 0, length: int = 0, chunk: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Yield the bytes ``[offset, offset+length)`` (``length=0``: to the end) in chunks."""
        with open(self.object_path(sha256), "rb") as f:
            f.seek(offset)
            remaining = length if length > 0 else None
            while remaining is None or remaining > 0:
                want = chunk if remaining is None else min(chunk, remaining)
                data = f.read(want)
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data
