"""Helpers of the control plane tests: submitting, playing a worker, counting rows.

Imported by the tests as `from control_support import …`.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from control.db import Database
from control.store import jobs as store
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
        return await store.transition_job(
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
