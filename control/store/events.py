"""The SQL of job history: reading `job_events` for WatchProgress.

Rows are written only by the transitions in control.store.jobs and
control.store.dispatch (same statement as the state change); this module reads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.schema import job_events

Row = sa.RowMapping

#: (column, SQL type) of a `job_events` row, typed so JSONB and timestamps decode
EVENT_TYPES = {c.name: c.type for c in job_events.c}

# A page of one job's history after a seq (primary key order: no sort needed).
_EVENTS_AFTER_SQL = sa.text(
    "SELECT * FROM job_events WHERE job_id = :job_id AND seq > :after_seq ORDER BY seq LIMIT :limit"
).columns(**EVENT_TYPES)


async def list_events(
    session: AsyncSession, job_id: uuid.UUID, after_seq: int, limit: int = 500
) -> list[Row]:
    """Up to `limit` events of the job with seq > after_seq, in seq order."""
    res = await session.execute(
        _EVENTS_AFTER_SQL, {"job_id": job_id, "after_seq": after_seq, "limit": limit}
    )
    return [r._mapping for r in res]


@dataclass(frozen=True)
class WatchRead:
    """One read of a watch: the job's state and last seq, and the events after a seq."""

    state: str
    last_seq: int
    events: list[Row]


# The job (the caller's tenant only) with a page of its events after a seq, in one
# statement: one snapshot, so `last_seq` and the events agree, and one round trip
# where a watch used to read the job, its last seq and its events one by one.
_WATCH_READ_SQL = sa.text(
    """
    SELECT j.state AS job_state, j.last_seq AS job_last_seq, e.*
    FROM jobs AS j
    LEFT JOIN LATERAL (
        SELECT * FROM job_events AS x
        WHERE x.job_id = j.id AND x.seq > :after_seq
        ORDER BY x.seq LIMIT :limit
    ) AS e ON true
    WHERE j.id = :job_id AND j.tenant = :tenant
    """
).columns(job_state=sa.Text(), job_last_seq=sa.BigInteger(), **EVENT_TYPES)

_JOB_FIELDS = ("job_state", "job_last_seq")


async def read_for_watch(
    session: AsyncSession, tenant: str, job_id: uuid.UUID, after_seq: int, limit: int = 500
) -> WatchRead | None:
    """The tenant's job and up to `limit` of its events with seq > after_seq; None: no job."""
    res = await session.execute(
        _WATCH_READ_SQL,
        {"tenant": tenant, "job_id": job_id, "after_seq": after_seq, "limit": limit},
    )
    rows = [r._mapping for r in res]
    if not rows:
        return None
    head = rows[0]
    events = [
        {k: v for k, v in r.items() if k not in _JOB_FIELDS} for r in rows if r["seq"] is not None
    ]
    return WatchRead(head["job_state"], head["job_last_seq"], events)
