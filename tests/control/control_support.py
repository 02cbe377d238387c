"""Helpers of the control plane tests: submitting, playing a worker, counting rows.

Imported by the tests as `from control_support import …`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.db import Database
from control.schema import jobs
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

pb = job_service_pb2


async def submit(
    stub: job_service_pb2_grpc.JobServiceStub, job_type: str = "debug.noop", **fields: Any
) -> job_pb2.Job:
    """Submit one job through the API and return it."""
    response = await stub.Submit(pb.SubmitRequest(job=job_pb2.JobSpec(type=job_type, **fields)))
    return response.job


async def move(
    db: Database,
    job_id: str,
    from_state: str,
    to_state: str,
    *,
    attempt: int | None = None,
    **extra: Any,
) -> Any:
    """Play a worker: one compare-and-set transition through the store (None if it lost)."""
    async with db.session() as s, s.begin():
        return await transition_job(
            s,
            uuid.UUID(job_id),
            from_states=(from_state,),
            to_state=to_state,
            attempt=attempt,
            **extra,
        )


async def count_rows(db: Database, table: str = "jobs") -> int:
    """Rows in a table (jobs, job_events, ...)."""
    async with db.session() as s:
        return int((await s.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def events_of(db: Database, job_id: str) -> list[Any]:
    """The job's stored events in seq order."""
    async with db.session() as s:
        result = await s.execute(
            sa.text("SELECT * FROM job_events WHERE job_id = :id ORDER BY seq"),
            {"id": uuid.UUID(job_id)},
        )
        return [r._mapping for r in result]


# Tests playing a worker move jobs by hand: any compare-and-set state change, with
# its STATE event and NOTIFYs (the control plane's own changes are the state
# machine's transitions, control/store/machine.py).
_TRANSITION_SQL = sa.text(
    """
    WITH u AS (
        UPDATE jobs SET
            state = :to_state,
            last_seq = last_seq + 1,
            updated_at = now(),
            started_at = CASE WHEN :to_state = 'running' THEN now() ELSE started_at END,
            finished_at = CASE WHEN :to_state IN ('succeeded', 'failed', 'canceled') THEN now() END,
            worker_id = coalesce(CAST(:worker_id AS text), worker_id),
            result = coalesce(CAST(:result AS jsonb), result),
            error = coalesce(CAST(:error AS jsonb), error),
            lease_expires_at = NULL,
            deadline_at = NULL
        WHERE id = :id
          AND state = ANY(CAST(:from_states AS text[]))
          AND (CAST(:tenant AS text) IS NULL OR tenant = CAST(:tenant AS text))
          AND (CAST(:attempt AS int) IS NULL OR attempt = CAST(:attempt AS int))
        RETURNING *
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, state, attempt, error, worker_id, message)
        SELECT id, last_seq, 'state', state, attempt, CAST(:error AS jsonb), worker_id, :message
        FROM u
    )
    SELECT u.*, pg_notify('spool_events', u.id::text)::text AS n,
           CASE WHEN u.state = 'queued' THEN pg_notify('spool_jobs', u.type)::text END AS nq
    FROM u
    """
).columns(**{c.name: c.type for c in jobs.c})


async def transition_job(
    session: AsyncSession,
    job_id: uuid.UUID,
    *,
    from_states: Sequence[str],
    to_state: str,
    tenant: str | None = None,
    attempt: int | None = None,
    worker_id: str | None = None,
    result: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    message: str = "",
) -> Any:
    """Move a job from one of `from_states` to `to_state` if nobody moved it first.

    Returns the updated row, or None when the compare-and-set lost (the job is
    in another state or attempt, or is not the tenant's).
    """
    res = await session.execute(
        _TRANSITION_SQL,
        {
            "id": job_id,
            "from_states": list(from_states),
            "to_state": to_state,
            "tenant": tenant,
            "attempt": attempt,
            "worker_id": worker_id,
            "result": json.dumps(dict(result)) if result is not None else None,
            "error": json.dumps(dict(error)) if error is not None else None,
            "message": message,
        },
    )
    row = res.first()
    return row._mapping if row else None
