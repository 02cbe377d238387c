"""Uploads and downloads through BlobService: hashed first, deduplicated, resumable."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from spool.client import errors
from spool.client._options import ClientOptions
from spool.v1 import blob_service_pb2, blob_service_pb2_grpc

#: BlobService accepts chunks of at most 1 MiB
CHUNK_BYTES = 1024 * 1024
#: statuses after which an upload or download is resumed from what arrived:
#: the server went away, or it refused a resume offset / saw the stream end early
_RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}

T = TypeVar("T")


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def safe_filename(name: str, fallback: str) -> str:
    """One plain path component (a server-chosen name never escapes the output dir)."""
    base = Path(name.replace("\\", "/")).name
    return fallback if base in ("", ".", "..") else base


class _Backoff:
    """Exponential delays within a time budget."""

    def __init__(self, options: ClientOptions, budget_s: float | None = None) -> None:
        self.delay = options.retry_initial_delay_s
        self.max_delay = options.retry_max_delay_s
        budget = options.retry_budget_s if budget_s is None else budget_s
        self.deadline = time.monotonic() + budget

    async def sleep(self) -> bool:
        """Wait before the next try; False when the budget is spent."""
        if time.monotonic() + self.delay > self.deadline:
            return False
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_delay)
        return True


async def retrying(
    call: Callable[[], Awaitable[T]], options: ClientOptions, *, retry: bool = True
) -> T:
    """Run `call`, retrying UNAVAILABLE with backoff when `retry`; errors become typed."""
    backoff = _Backoff(options)
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if retry and exc.code() == grpc.StatusCode.UNAVAILABLE and await backoff.sleep():
                continue
            raise errors.from_rpc_error(exc) from None


async def _chunks(path: Path, offset: int) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        while block := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield block
    finally:
        f.close()


async def upload_file(
    stub: blob_service_pb2_grpc.BlobServiceStub, path: Path, options: ClientOptions
) -> blob_service_pb2.Blob:
    """Upload `path` (skipped when the blob exists; resumed when partly there)."""
    sha, size = await asyncio.to_thread(file_sha256, path)
    uri = f"blob:sha256:{sha}"
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    md = options.metadata()
    backoff = _Backoff(options)
    while True:
        try:
            offset = 0
            try:
                st = await stub.Stat(
                    blob_service_pb2.StatRequest(uri=uri), metadata=md, timeout=options.timeout_s
                )
                if st.complete:
                    return st.blob
                if 0 < st.uploaded_bytes <= size:
                    offset = st.uploaded_bytes
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            header = blob_service_pb2.UploadRequest.Header(
                sha256=sha, size=size, content_type=content_type, filename=path.name, offset=offset
            )

            async def requests(
                header: blob_service_pb2.UploadRequest.Header = header,
            ) -> AsyncIterator[blob_service_pb2.UploadRequest]:
                yield blob_service_pb2.UploadRequest(header=header)
                async for block in _chunks(path, header.offset):
                    yield blob_service_pb2.UploadRequest(chunk=block)

            response = await stub.Upload(requests(), metadata=md)
            return response.blob
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _RESUMABLE and await backoff.sleep():
                continue
            raise errors.from_rpc_error(exc) from None


async def download_blob(
    stub: blob_service_pb2_grpc.BlobServiceStub,
    uri: str,
    output_dir: Path,
    options: ClientOptions,
    *,
    taken: set[str] | None = None,
) -> Path:
    """Download `uri` into `output_dir` under its stored filename; resumes, verifies sha256."""
    sha = uri.removeprefix("blob:sha256:")
    await asyncio.to_thread(output_dir.mkdir, parents=True, exist_ok=True)
    part = output_dir / f".{sha}.part"
    md = options.metadata()
    blob: Any = None
    backoff = _Backoff(options)
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            stream = stub.Download(
                blob_service_pb2.DownloadRequest(uri=uri, offset=offset), metadata=md
            )
            f = await asyncio.to_thread(open, part, "ab")
            try:
                async for msg in stream:
                    if msg.HasField("blob"):
                        blob = msg.blob
                    if msg.chunk:
                        await asyncio.to_thread(f.write, msg.chunk)
            finally:
                f.close()
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and await backoff.sleep():
                continue
            raise errors.from_rpc_error(exc) from None
    got, _ = await asyncio.to_thread(file_sha256, part)
    if got != sha:
        part.unlink(missing_ok=True)
        raise errors.IntegrityError(f"{uri}: downloaded content has sha256 {got}")
    name = safe_filename(blob.filename if blob is not None else "", sha)
    if taken is not None:
        stem, suffix = os.path.splitext(name)
        n = 1
        while name in taken:
            name = f"{stem}-{n}{suffix}"
            n += 1
        taken.add(name)
    final = output_dir / name
    part.replace(final)
    return final
