"""The SQL of job history: reading `job_events` for WatchProgress.

Rows are written only by the transitions in control.store.jobs and
control.store.dispatch (same statement as the state change); this module reads.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.schema import job_events

Row = sa.RowMapping

_EVENT_TYPES = {c.name: c.type for c in job_events.c}

# A page of one job's history after a seq (primary key order: no sort needed).
_EVENTS_AFTER_SQL = sa.text(
    "SELECT * FROM job_events WHERE job_id = :job_id AND seq > :after_seq ORDER BY seq LIMIT :limit"
).columns(**_EVENT_TYPES)


async def list_events(
    session: AsyncSession, job_id: uuid.UUID, after_seq: int, limit: int = 500
) -> list[Row]:
    """Up to `limit` events of the job with seq > after_seq, in seq order."""
    res = await session.execute(
        _EVENTS_AFTER_SQL, {"job_id": job_id, "after_seq": after_seq, "limit": limit}
    )
    return [r._mapping for r in res]
