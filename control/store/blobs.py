"""The SQL of BlobService: per-tenant blob rows, quotas, and garbage collection.

A row (tenant, sha256) says a tenant may read that content; the bytes live on
disk once per sha256 (`control.blobstore`). Functions take a session and never
commit: the caller owns the transaction.

Two advisory locks order the writers that must not interleave:
`lock_tenant` (quota check + insert of a tenant's new upload) and `lock_content`
(committing content to disk vs. deleting the last row that references it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from control.blobstore import parse_blob_uri
from control.schema import blobs

Row = Mapping[str, Any]

_BLOB_TYPES = {c.name: c.type for c in blobs.c}

# hashtextextended gives a 64-bit key; the prefixes keep the two lock families apart.
_LOCK_SQL = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


async def lock_tenant(session: AsyncSession, tenant: str) -> None:
    """Serialise quota checks of one tenant until the transaction ends."""
    await session.execute(_LOCK_SQL, {"key": f"spool.blobs.tenant:{tenant}"})


async def lock_content(session: AsyncSession, sha256: str) -> None:
    """Serialise committing and deleting the on-disk content of one sha256."""
    await session.execute(_LOCK_SQL, {"key": f"spool.blobs.content:{sha256}"})


_GET_SQL = sa.text("SELECT * FROM blobs WHERE tenant = :tenant AND sha256 = :sha").columns(
    **_BLOB_TYPES
)


async def get_blob(session: AsyncSession, tenant: str, sha256: str) -> Row | None:
    """The tenant's row for this content (finished or not), or None."""
    row = (await session.execute(_GET_SQL, {"tenant": tenant, "sha": sha256})).first()
    return row._mapping if row else None


_USAGE_SQL = sa.text("SELECT coalesce(sum(size), 0) FROM blobs WHERE tenant = :tenant")


async def tenant_usage(session: AsyncSession, tenant: str) -> int:
    """Bytes the tenant holds or has reserved (unfinished uploads count at full size)."""
    return int((await session.execute(_USAGE_SQL, {"tenant": tenant})).scalar_one())


# Unfinished rows are restarted in place; a finished row is never touched here.
_UPSERT_PENDING_SQL = sa.text(
    """
    INSERT INTO blobs (tenant, sha256, size, uploaded_bytes, complete, content_type, filename)
    VALUES (:tenant, :sha, :size, :uploaded, false, :content_type, :filename)
    ON CONFLICT (tenant, sha256) DO UPDATE
       SET size = EXCLUDED.size, uploaded_bytes = EXCLUDED.uploaded_bytes,
           content_type = EXCLUDED.content_type, filename = EXCLUDED.filename,
           last_used_at = now()
     WHERE blobs.complete = false
    """
)


async def upsert_pending(
    session: AsyncSession,
    tenant: str,
    sha256: str,
    *,
    size: int,
    uploaded_bytes: int,
    content_type: str,
    filename: str,
) -> None:
    """Create (or restart) the tenant's unfinished upload row."""
    await session.execute(
        _UPSERT_PENDING_SQL,
        {
            "tenant": tenant,
            "sha": sha256,
            "size": size,
            "uploaded": uploaded_bytes,
            "content_type": content_type,
            "filename": filename,
        },
    )


_SET_UPLOADED_SQL = sa.text(
    "UPDATE blobs SET uploaded_bytes = :n, last_used_at = now() "
    "WHERE tenant = :tenant AND sha256 = :sha AND complete = false"
)


async def set_uploaded_bytes(session: AsyncSession, tenant: str, sha256: str, n: int) -> None:
    """Record how far an unfinished upload got (informational; the disk is the truth)."""
    await session.execute(_SET_UPLOADED_SQL, {"tenant": tenant, "sha": sha256, "n": n})


_COMPLETE_SQL = sa.text(
    """
    UPDATE blobs SET complete = true, uploaded_bytes = size, last_used_at = now()
    WHERE tenant = :tenant AND sha256 = :sha
    RETURNING *
    """
).columns(**_BLOB_TYPES)


async def mark_complete(session: AsyncSession, tenant: str, sha256: str) -> Row | None:
    """Mark the tenant's upload finished; returns the row (None if it vanished)."""
    row = (await session.execute(_COMPLETE_SQL, {"tenant": tenant, "sha": sha256})).first()
    return row._mapping if row else None


_DELETE_SQL = sa.text("DELETE FROM blobs WHERE tenant = :tenant AND sha256 = :sha")


async def delete_blob(session: AsyncSession, tenant: str, sha256: str) -> None:
    """Delete the tenant's row."""
    await session.execute(_DELETE_SQL, {"tenant": tenant, "sha": sha256})


_TOUCH_SQL = sa.text(
    "UPDATE blobs SET last_used_at = now() WHERE tenant = :tenant AND sha256 = :sha"
)


async def touch(session: AsyncSession, tenant: str, sha256: str) -> None:
    """Note a use of the blob (garbage collection counts age from the last use)."""
    await session.execute(_TOUCH_SQL, {"tenant": tenant, "sha": sha256})


_CONTENT_USED_SQL = sa.text("SELECT EXISTS (SELECT 1 FROM blobs WHERE sha256 = :sha AND complete)")


async def content_referenced(session: AsyncSession, sha256: str) -> bool:
    """True while any tenant's finished row still points at this content."""
    return bool((await session.execute(_CONTENT_USED_SQL, {"sha": sha256})).scalar_one())


_PRESENT_SQL = sa.text(
    "SELECT sha256 FROM blobs WHERE tenant = :tenant AND complete AND sha256 = ANY(:shas)"
)


async def missing_blobs(session: AsyncSession, tenant: str, uris: Iterable[str]) -> list[str]:
    """The `blob:` URIs among `uris` the tenant does not hold finished (malformed ones too).

    Other schemes are ignored. Used by Submit to refuse jobs whose blob inputs
    do not exist.
    """
    wanted = [u for u in uris if u.startswith("blob:")]
    if not wanted:
        return []
    shas = {u: parse_blob_uri(u) for u in wanted}
    valid = sorted({s for s in shas.values() if s})
    present: set[str] = set()
    if valid:
        result = await session.execute(_PRESENT_SQL, {"tenant": tenant, "shas": valid})
        present = {r[0] for r in result}
    return [u for u in wanted if shas[u] not in present]


# The job a worker says it acts for, with the owner (key) of the worker id it
# names: the call is allowed only for the attempt that worker holds.
_JOB_SQL = sa.text(
    """
    SELECT j.tenant, j.state, j.attempt, j.worker_id, j.inputs,
           (SELECT w.owner FROM workers AS w WHERE w.id = :worker_id) AS worker_owner
    FROM jobs AS j WHERE j.id = :id
    """
).columns(inputs=JSONB)


async def job_for_worker(session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> Row | None:
    """tenant, state, attempt, holder and inputs of a job a worker says it acts for (any
    tenant), and the owner of `worker_id` (None when no such worker is registered)."""
    row = (await session.execute(_JOB_SQL, {"id": job_id, "worker_id": worker_id})).first()
    return row._mapping if row else None


# Rows unused for longer than the retention that no job of their tenant names
# as an input or output (jobs deleted by retention or Delete no longer hold
# them). Oldest first, SKIP LOCKED so replicas split the work.
_EXPIRED_SQL = sa.text(
    """
    DELETE FROM blobs WHERE (tenant, sha256) IN (
        SELECT b.tenant, b.sha256 FROM blobs b
        WHERE b.last_used_at < now() - CAST(:age_s AS double precision) * interval '1 second'
          AND NOT EXISTS (
              SELECT 1 FROM jobs j
              WHERE j.tenant = b.tenant
                AND (j.inputs @> jsonb_build_array('blob:sha256:' || b.sha256)
                     OR j.outputs @> jsonb_build_array('blob:sha256:' || b.sha256)))
        ORDER BY b.last_used_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED)
    RETURNING tenant, sha256, complete
    """
)


async def delete_expired_blobs(session: AsyncSession, age_s: float, batch: int) -> list[Row]:
    """Delete up to `batch` unreferenced rows unused for `age_s`; returns what went."""
    result = await session.execute(_EXPIRED_SQL, {"age_s": age_s, "batch": batch})
    return [r._mapping for r in result]
