"""BlobService decisions: who the bytes belong to, quotas, resumable uploads, collection.

The servicer (`control.servicers.blob_service`) converts protobuf; this module
decides; `control.store.blobs` holds the SQL and `control.blobstore` the files.

Tenancy: a client key acts for its own tenant. A worker key acts for the
attempt it holds: it names the job, its worker id and the attempt in the
``spool-job-id``, ``spool-worker-id`` and ``spool-attempt`` metadata; the job
must be RUNNING that attempt on that worker, the worker id must be registered
to the calling key, and the call uses the job's tenant: downloads only of the
job's ``blob:`` inputs, uploads (its outputs) land in that tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from control import auth, validate
from control.blobstore import CHUNK_BYTES, BlobStore, PartialUpload, is_sha256, parse_blob_uri
from control.config import Settings
from control.db import Database
from control.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from control.periodic import Periodic
from control.store import blobs as store

log = logging.getLogger(__name__)

T = TypeVar("T")

JOB_ID_HEADER = "spool-job-id"
#: with a worker key, the worker and the attempt of that job it holds
WORKER_ID_HEADER = "spool-worker-id"
ATTEMPT_HEADER = "spool-attempt"
_WORKER_HEADERS = (JOB_ID_HEADER, WORKER_ID_HEADER, ATTEMPT_HEADER)
#: a resumed upload waits this long for the broken stream's handler to let go
UPLOAD_LOCK_WAIT_S = 10.0
#: rows deleted per garbage-collection transaction
GC_BATCH = 500
MAX_FILENAME_LEN = 1024
MAX_CONTENT_TYPE_LEN = 256
#: a blob URI is `blob:sha256:` and 64 hex digits; longer text is not even looked at
MAX_URI_LEN = 200


@dataclass(frozen=True)
class Access:
    """Whose blobs a call may touch: a tenant's, and for a worker only its job's inputs."""

    tenant: str
    #: the sha256s a worker may download (its attempt's inputs); None: any of the tenant's
    readable: frozenset[str] | None = None

    def check_read(self, sha: str) -> None:
        """NOT_FOUND unless the caller may read blob `sha`."""
        if self.readable is not None and sha not in self.readable:
            raise NotFound(f"blob sha256:{sha} is not an input of this job")


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an Upload, as plain values."""

    sha256: str
    size: int
    content_type: str = ""
    filename: str = ""
    offset: int = 0


def blob_dir(settings: Settings) -> Path:
    """SPOOL_BLOB_DIR, or <data_dir>/blobs."""
    return Path(settings.blob_dir or Path(settings.data_dir) / "blobs")


def sha_of(uri: str, field: str = "uri") -> str:
    """The sha256 of a ``blob:sha256:<hex>`` URI, or InvalidArgument naming `field`."""
    sha = parse_blob_uri(uri) if len(uri) <= MAX_URI_LEN else None
    if sha is None:
        raise InvalidArgument(field, f"want blob:sha256:<64 hex digits>, got {uri[:100]!r}")
    return sha


class Blobs:
    """The blob service of one control plane process."""

    def __init__(self, db: Database, settings: Settings, store_: BlobStore | None = None) -> None:
        self.db = db
        self.settings = settings
        self.files = store_ or BlobStore(blob_dir(settings))
        self._upload_locks: dict[tuple[str, str], list[Any]] = {}

    async def _tx(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in its own session and transaction, shielded from caller cancellation."""

        async def run() -> T:
            async with self.db.transaction() as s:
                return await work(s)

        return await self.db.shielded(run())

    # -- who ---------------------------------------------------------------------------
    async def tenant_for(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        """The tenant this call acts for (see the module docstring)."""
        return (await self.access_for(metadata)).tenant

    async def access_for(self, metadata: Sequence[tuple[str, Any]] | None) -> Access:
        """Whose blobs this call may touch (see the module docstring)."""
        principal = auth.current_principal()
        headers = {k: str(v) for k, v in metadata or () if k in _WORKER_HEADERS}
        job_header = headers.get(JOB_ID_HEADER, "")
        if principal.role == auth.CLIENT or (principal.role == auth.ADMIN and not job_header):
            return Access(principal.tenant)
        if not job_header:
            raise InvalidArgument(JOB_ID_HEADER, "a worker key must name the job it acts for")
        try:
            job_id = uuid.UUID(job_header)
        except ValueError:
            raise InvalidArgument(JOB_ID_HEADER, "not a UUID") from None
        worker_id = headers.get(WORKER_ID_HEADER, "")
        if not worker_id or len(worker_id) > 200 or "\x00" in worker_id:
            raise InvalidArgument(WORKER_ID_HEADER, "a worker key must name its worker id")
        try:
            attempt = int(headers.get(ATTEMPT_HEADER, ""))
        except ValueError:
            raise InvalidArgument(ATTEMPT_HEADER, "the attempt it acts for, a number") from None
        job = await self._tx(lambda s: store.job_for_worker(s, job_id, worker_id))
        tenants = principal.job_tenants
        if job is None or (tenants is not None and job["tenant"] not in tenants):
            raise NotFound(f"job {job_id} not found")
        if job["state"] != "running":
            raise FailedPrecondition(f"job {job_id} is {job['state']}, not running")
        if job["worker_owner"] is None or (
            principal.role != auth.ADMIN and job["worker_owner"] != principal.owner
        ):
            raise PermissionDenied(f"worker {worker_id!r} is not registered to this key")
        if job["worker_id"] != worker_id or job["attempt"] != attempt:
            raise PermissionDenied(
                f"job {job_id} attempt {attempt} is not held by worker {worker_id!r}"
            )
        inputs = frozenset(
            sha for sha in (parse_blob_uri(u) for u in job["inputs"] or ()) if sha is not None
        )
        return Access(str(job["tenant"]), inputs)

    # -- upload ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _upload_lock(self, tenant: str, sha: str) -> AsyncIterator[None]:
        # One stream per (tenant, content) writes its partial file at a time. A
        # client resuming right after a break may arrive before the old
        # handler noticed, so wait a little instead of refusing at once.
        key = (tenant, sha)
        entry = self._upload_locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1  # holders and waiters: the lock is dropped only when none are left
        lock: asyncio.Lock = entry[0]
        try:
            try:
                await asyncio.wait_for(lock.acquire(), UPLOAD_LOCK_WAIT_S)
            except TimeoutError:
                raise FailedPrecondition(
                    f"another upload of sha256 {sha} is in progress", reason="UPLOAD_IN_PROGRESS"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._upload_locks[key]

    def _check_header(self, h: UploadHeader) -> str:
        sha = h.sha256.lower()
        if not is_sha256(sha):
            raise InvalidArgument("header.sha256", "want 64 hex digits")
        if h.size < 0:
            raise InvalidArgument("header.size", "must be >= 0")
        if not 0 <= h.offset <= h.size:
            raise InvalidArgument("header.offset", f"must be between 0 and size ({h.size})")
        validate.text("header.filename", h.filename, max_len=MAX_FILENAME_LEN)
        validate.text("header.content_type", h.content_type, max_len=MAX_CONTENT_TYPE_LEN)
        quota = self.settings.blob_quota_bytes
        if quota and h.size > quota:
            raise ResourceExhausted(
                f"blob of {h.size} bytes exceeds the per-tenant quota of {quota} bytes",
                reason="BLOB_QUOTA",
            )
        return sha

    async def _begin_upload(self, tenant: str, sha: str, h: UploadHeader) -> Any:
        """Check offset and quota and (re)open the row; returns the finished row or None."""

        async def work(s: AsyncSession) -> Any:
            await store.lock_tenant(s, tenant)
            row = await store.get_blob(s, tenant, sha)
            if row is not None and row["complete"]:
                return row
            have = await asyncio.to_thread(self.files.partial_size, tenant, sha) if row else 0
            if row is not None and h.offset and row["size"] != h.size:
                raise InvalidArgument(
                    "header.size", f"the unfinished upload of this blob has size {row['size']}"
                )
            # Offset 0 always (re)starts; any other offset must continue exactly.
            if h.offset not in (0, have):
                raise FailedPrecondition(
                    f"header.offset: expected offset {have} (bytes received so far), "
                    f"got {h.offset}",
                    reason="UPLOAD_OFFSET",
                )
            quota = self.settings.blob_quota_bytes
            if quota:
                used = await store.tenant_usage(s, tenant) - (row["size"] if row else 0)
                if used + h.size > quota:
                    raise ResourceExhausted(
                        f"blob quota exceeded: {used} of {quota} bytes used, "
                        f"this blob needs {h.size}",
                        reason="BLOB_QUOTA",
                    )
            await store.upsert_pending(
                s,
                tenant,
                sha,
                size=h.size,
                uploaded_bytes=h.offset,
                content_type=h.content_type,
                filename=h.filename,
            )
            return None

        return await self._tx(work)

    async def upload(self, tenant: str, h: UploadHeader, chunks: AsyncIterator[bytes]) -> Any:
        """Store the stream's bytes after `h`; returns the finished row.

        Errors: InvalidArgument (header fields, a chunk over 1 MiB or past
        `size`, content not matching `sha256` — the partial is then discarded),
        FailedPrecondition (wrong resume offset, stream ended early — resumable),
        ResourceExhausted (quota, checked before anything is written).
        """
        sha = self._check_header(h)
        async with self._upload_lock(tenant, sha):
            done = await self._begin_upload(tenant, sha, h)
            if done is not None:
                return done  # the tenant has this content already: nothing to send
            partial = await asyncio.to_thread(self.files.open_partial, tenant, sha, h.offset)
            ok = False
            try:
                async for chunk in chunks:
                    if len(chunk) > CHUNK_BYTES:
                        raise InvalidArgument(
                            "chunk", f"at most {CHUNK_BYTES} bytes per message, got {len(chunk)}"
                        )
                    if partial.size + len(chunk) > h.size:
                        raise InvalidArgument(
                            "chunk", f"more bytes than header.size ({h.size}) were sent"
                        )
                    await asyncio.to_thread(partial.write, chunk)
                ok = True
            finally:
                partial.close()
                if not ok:
                    await self._after_broken(tenant, sha, partial)
            if partial.size < h.size:
                await self._after_broken(tenant, sha, partial)
                raise FailedPrecondition(
                    f"upload incomplete: {partial.size} of {h.size} bytes received; "
                    f"resume with header.offset={partial.size}",
                    reason="UPLOAD_INCOMPLETE",
                )
            return await self._finish(tenant, sha, partial)

    async def _after_broken(self, tenant: str, sha: str, partial: PartialUpload) -> None:
        # Shielded: the stream's task may be cancelled (client gone) while we record.
        async def record(s: AsyncSession) -> None:
            if partial.size == 0:
                # Nothing arrived: leave no trace of this upload.
                await store.delete_blob(s, tenant, sha)
                await asyncio.to_thread(self.files.discard_partial, tenant, sha)
            else:
                await store.set_uploaded_bytes(s, tenant, sha, partial.size)

        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._tx(record)

    async def _finish(self, tenant: str, sha: str, partial: PartialUpload) -> Any:
        got = partial.hexdigest()
        if got != sha:
            await self._tx(lambda s: store.delete_blob(s, tenant, sha))
            await asyncio.to_thread(self.files.discard_partial, tenant, sha)
            raise InvalidArgument(
                "header.sha256", f"the content's sha256 is {got}; nothing was stored"
            )

        async def commit(s: AsyncSession) -> Any:
            # Under the content lock so a collector cannot delete the shared file
            # between our commit to disk and the row turning complete.
            await store.lock_content(s, sha)
            await asyncio.to_thread(self.files.commit_partial, tenant, sha)
            return await store.mark_complete(s, tenant, sha)

        row = await self._tx(commit)
        if row is None:
            raise FailedPrecondition(f"the upload of {sha} was removed while it finished")
        return row

    # -- read ------------------------------------------------------------------------------
    async def stat(self, tenant: str, sha: str) -> tuple[Any, int]:
        """(row, bytes received); NotFound when the tenant has no such blob."""
        row = await self._tx(lambda s: store.get_blob(s, tenant, sha))
        if row is None:
            raise NotFound(f"blob:sha256:{sha} not found")
        if row["complete"]:
            return row, int(row["size"])
        return row, await asyncio.to_thread(self.files.partial_size, tenant, sha)

    async def open_download(
        self, tenant: str, sha: str, offset: int, length: int
    ) -> tuple[Any, AsyncIterator[tuple[int, bytes]]]:
        """The row and an iterator of (offset, chunk) over the requested range."""
        if offset < 0:
            raise InvalidArgument("offset", "must be >= 0")
        if length < 0:
            raise InvalidArgument("length", "must be >= 0 (0 = to the end)")

        async def read(s: AsyncSession) -> Any:
            row = await store.get_blob(s, tenant, sha)
            if row is not None and row["complete"]:
                await store.touch(s, tenant, sha)
            return row

        row = await self._tx(read)
        if row is None or not row["complete"]:
            raise NotFound(f"blob:sha256:{sha} not found")
        size = int(row["size"])
        if offset > size:
            raise InvalidArgument("offset", f"past the end of the blob ({size} bytes)")
        end = size if length == 0 else min(size, offset + length)
        f = await asyncio.to_thread(self.files.open_object, sha)

        async def chunks() -> AsyncIterator[tuple[int, bytes]]:
            pos = offset
            try:
                await asyncio.to_thread(f.seek, offset)
                while pos < end:
                    data = await asyncio.to_thread(f.read, min(CHUNK_BYTES, end - pos))
                    if not data:
                        raise RuntimeError(f"blob {sha} is shorter on disk than its row says")
                    yield pos, data
                    pos += len(data)
            finally:
                f.close()

        return row, chunks()

    # -- garbage collection -------------------------------------------------------------
    async def collect_garbage(self, age_s: float | None = None) -> int:
        """Delete unreferenced blobs unused for `age_s` (default: retention); returns rows."""
        age_s = self.settings.retention_s if age_s is None else age_s
        total = 0
        while True:
            gone = await self._tx(lambda s: store.delete_expired_blobs(s, age_s, GC_BATCH))
            for row in gone:
                tenant, sha = row["tenant"], row["sha256"]
                if not row["complete"]:
                    await asyncio.to_thread(self.files.discard_partial, tenant, sha)
                    continue
                await self._tx(lambda s, sha=sha: self._drop_content(s, sha))
            total += len(gone)
            if len(gone) < GC_BATCH:
                break
        if total:
            log.info("blob collector deleted %d blob rows", total)
        return total

    async def _drop_content(self, s: AsyncSession, sha: str) -> None:
        # Under the content lock: an upload of the same bytes cannot commit meanwhile.
        await store.lock_content(s, sha)
        if not await store.content_referenced(s, sha):
            await asyncio.to_thread(self.files.delete_object, sha)


class BlobCollector:
    """Background task: `Blobs.collect_garbage` every `blob_gc_interval_s`."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs
        self._loop = Periodic(
            "control.blob_gc", blobs.collect_garbage, blobs.settings.blob_gc_interval_s
        )

    async def start(self) -> None:
        """Start the loop."""
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop (a collection in flight finishes)."""
        await self._loop.stop()


async def check_blob_inputs(
    session: AsyncSession, tenant: str, jobs: Sequence[tuple[str, Sequence[str]]]
) -> None:
    """Refuse jobs whose ``blob:`` inputs the tenant does not hold (one query, none if no blobs).

    `jobs` is (field prefix, inputs) per job, e.g. ``[("job", spec.inputs)]``;
    the error names the first missing one, e.g. ``job.inputs[1]``.
    """
    uris = [u for _, inputs in jobs for u in inputs if u.startswith("blob:")]
    if not uris:
        return
    missing = set(await store.missing_blobs(session, tenant, uris))
    for prefix, inputs in jobs:
        for i, uri in enumerate(inputs):
            if uri in missing:
                raise InvalidArgument(
                    f"{prefix}.inputs[{i}]", f"no such blob for this tenant: {uri[:100]}"
                )
