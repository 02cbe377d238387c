"""The SQL of the job API: submit, read, list, cancel, retry, delete, stats, retention.

Each function takes a session and never commits: the caller owns the
transaction. Every state change is one conditional UPDATE (compare-and-set on
state, and attempt where the caller knows it) that bumps `jobs.last_seq`,
appends the `job_events` row with that seq and issues
`pg_notify('spool_events', <job id>)` in the same statement, so a racing writer
loses cleanly and a watcher always finds the event it was woken for.

Rows come back as mappings with JSONB columns decoded (dicts and lists). A
function that is a single statement may also be given an autocommit connection
(`Database.autocommit()`), which saves the BEGIN/COMMIT round trips.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.schema import TERMINAL_STATES, jobs, workers
from control.store import machine

#: a result row as a read-only mapping (column name -> value)
Row = sa.RowMapping

# job_events.kind values (protos: JOB_EVENT_KIND_*).
EVENT_STATE = "state"
EVENT_CANCEL_REQUESTED = "cancel_requested"
#: job_events.message of the QUEUED event written by Retry; the attempt of the
#: latest such event is where the current attempt budget started.
RETRY_MESSAGE = "retry"

# Result columns typed so JSONB and timestamps decode.
_JOB_TYPES = {c.name: c.type for c in jobs.c}
_WORKER_TYPES = {c.name: c.type for c in workers.c}
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in TERMINAL_STATES) + ")"


@dataclass(frozen=True)
class NewJob:
    """One validated job to insert (see control.services.jobs for the rules)."""

    id: uuid.UUID
    type: str
    params: Mapping[str, Any]
    inputs: Sequence[str]
    priority: int
    labels: Mapping[str, str]
    worker_selector: Mapping[str, str]
    concurrency_key: str | None
    concurrency_limit: int
    min_start_interval_ms: int
    not_before: datetime | None
    timeout_ms: int
    max_attempts: int
    request_id: str | None
    #: what was asked, hashed (only with a request_id: the idempotency check)
    spec_hash: str | None
    #: `params` as JSON text, when the caller already has it (saves serializing it twice)
    params_json: str = ""


# ---------------------------------------------------------------- submit

# Insert many jobs in one statement, each QUEUED with its seq-1 STATE event.
# Jobs whose (tenant, request_id) already exists are skipped (the partial unique
# index arbitrates concurrent submits: the loser waits for the winner's commit,
# then inserts nothing); the caller reads those back by request_id. Wakes idle
# workers with `spool_jobs` (Postgres delivers identical notifications of one
# transaction once, so a batch sends one per type). No spool_events NOTIFY:
# nobody can be watching a job that did not exist yet. One statement, so it
# can run outside an explicit transaction (one round trip).
#
# The jobs travel as one typed array per column (asyncpg encodes them in binary;
# JSON values and times as text, cast here), and only what the database decides comes
# back: the rest of each row is what the caller sent (`_inserted_row`).
_INSERT_JOBS_SQL = sa.text(
    """
    WITH spec AS (
        SELECT * FROM unnest(
            CAST(:id AS uuid[]), CAST(:type AS text[]), CAST(:params AS text[]),
            CAST(:inputs AS text[]), CAST(:priority AS smallint[]), CAST(:labels AS text[]),
            CAST(:worker_selector AS text[]), CAST(:concurrency_key AS text[]),
            CAST(:concurrency_limit AS int[]), CAST(:min_start_interval_ms AS bigint[]),
            CAST(:not_before AS text[]), CAST(:timeout_ms AS bigint[]),
            CAST(:max_attempts AS int[]), CAST(:request_id AS text[]), CAST(:spec_hash AS text[])
        ) WITH ORDINALITY AS s(
            id, type, params, inputs, priority, labels, worker_selector, concurrency_key,
            concurrency_limit, min_start_interval_ms, not_before, timeout_ms, max_attempts,
            request_id, spec_hash, ord)
    ),
    ins AS (
        INSERT INTO jobs (id, tenant, type, params, inputs, priority, labels, worker_selector,
                          concurrency_key, concurrency_limit, min_start_interval_ms, not_before,
                          timeout_ms, max_attempts, attempt, state, request_id, spec_hash,
                          last_seq)
        SELECT id, :tenant, type, CAST(params AS jsonb), CAST(inputs AS jsonb), priority,
               CAST(labels AS jsonb), CAST(worker_selector AS jsonb), concurrency_key,
               concurrency_limit, min_start_interval_ms,
               coalesce(CAST(not_before AS timestamptz), now()),
               timeout_ms, max_attempts, 1, 'queued', request_id, spec_hash, 1
        FROM spec ORDER BY ord
        ON CONFLICT (tenant, request_id) WHERE request_id IS NOT NULL DO NOTHING
        RETURNING id, type, not_before, created_at, updated_at
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, state, attempt, created_at)
        SELECT id, 1, 'state', 'queued', 1, created_at FROM ins
    )
    SELECT ins.id, ins.not_before, ins.created_at, ins.updated_at,
           pg_notify('spool_jobs', ins.type)::text AS n
    FROM ins
    """
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _insert_args(tenant: str, new_jobs: Sequence[NewJob]) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "id": [job.id for job in new_jobs],
        "type": [job.type for job in new_jobs],
        "params": [job.params_json or _dumps(dict(job.params)) for job in new_jobs],
        "inputs": [_dumps(list(job.inputs)) for job in new_jobs],
        "priority": [job.priority for job in new_jobs],
        "labels": [_dumps(dict(job.labels)) for job in new_jobs],
        "worker_selector": [_dumps(dict(job.worker_selector)) for job in new_jobs],
        "concurrency_key": [job.concurrency_key for job in new_jobs],
        "concurrency_limit": [job.concurrency_limit for job in new_jobs],
        "min_start_interval_ms": [job.min_start_interval_ms for job in new_jobs],
        # As text: asyncpg's binary encoding turns datetime.min into -infinity.
        "not_before": [job.not_before.isoformat() if job.not_before else None for job in new_jobs],
        "timeout_ms": [job.timeout_ms for job in new_jobs],
        "max_attempts": [job.max_attempts for job in new_jobs],
        "request_id": [job.request_id for job in new_jobs],
        "spec_hash": [job.spec_hash for job in new_jobs],
    }


def _inserted_row(tenant: str, job: NewJob, db: Mapping[str, Any]) -> dict[str, Any]:
    """The whole jobs row of a job just inserted: what was sent, and what the database set
    (`db`: id, not_before, created_at, updated_at). The same keys and values as `SELECT *`."""
    return {
        "id": db["id"],
        "tenant": tenant,
        "type": job.type,
        "params": dict(job.params),
        "inputs": list(job.inputs),
        "outputs": [],
        "priority": job.priority,
        "labels": dict(job.labels),
        "worker_selector": dict(job.worker_selector),
        "concurrency_key": job.concurrency_key,
        "concurrency_limit": job.concurrency_limit,
        "min_start_interval_ms": job.min_start_interval_ms,
        "not_before": db["not_before"],
        "timeout_ms": job.timeout_ms,
        "max_attempts": job.max_attempts,
        "attempt": 1,
        "state": "queued",
        "cancel_requested": False,
        "progress": None,
        "result": None,
        "error": None,
        "worker_id": None,
        "lease_expires_at": None,
        "deadline_at": None,
        "cancel_requested_at": None,
        "created_at": db["created_at"],
        "started_at": None,
        "finished_at": None,
        "updated_at": db["updated_at"],
        "request_id": job.request_id,
        "spec_hash": job.spec_hash,
        "last_seq": 1,
    }


async def insert_jobs(
    session: AsyncSession, tenant: str, new_jobs: Sequence[NewJob]
) -> list[dict[str, Any]]:
    """Insert QUEUED jobs (skipping request_ids the tenant already used); returns the
    inserted rows (whole rows, as `get_job` reads them)."""
    if not new_jobs:
        return []
    result = await session.execute(_INSERT_JOBS_SQL, _insert_args(tenant, new_jobs))
    by_id = {job.id: job for job in new_jobs}
    return [_inserted_row(tenant, by_id[r.id], r._mapping) for r in result]


# Jobs of a tenant by idempotency key (to answer a repeated submit).
_BY_REQUEST_IDS_SQL = sa.text(
    "SELECT * FROM jobs WHERE tenant = :tenant AND request_id = ANY(CAST(:ids AS text[]))"
).columns(**_JOB_TYPES)


async def get_jobs_by_request_ids(
    session: AsyncSession, tenant: str, request_ids: Iterable[str]
) -> dict[str, Row]:
    """request_id → job row, for those of `request_ids` the tenant already used."""
    result = await session.execute(
        _BY_REQUEST_IDS_SQL, {"tenant": tenant, "ids": list(request_ids)}
    )
    return {r._mapping["request_id"]: r._mapping for r in result}


# ---------------------------------------------------------------- read

_GET_SQL = sa.text("SELECT * FROM jobs WHERE id = :id AND tenant = :tenant").columns(**_JOB_TYPES)


async def get_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> Row | None:
    """The tenant's job, or None (missing and other tenants' jobs look the same)."""
    result = await session.execute(_GET_SQL, {"id": job_id, "tenant": tenant})
    row = result.first()
    return row._mapping if row else None


async def list_jobs(
    session: AsyncSession,
    tenant: str,
    *,
    states: Sequence[str] = (),
    job_type: str = "",
    labels: Mapping[str, str] | None = None,
    after: tuple[datetime, uuid.UUID] | None = None,
    limit: int = 50,
) -> list[Row]:
    """The tenant's jobs newest first, after the keyset position `after` (created_at, id).

    Served by ix_jobs_tenant_created; the row comparison keeps pages stable
    while jobs are inserted (new jobs sort before the position, never into it).
    """
    where = ["tenant = :tenant"]
    params: dict[str, Any] = {"tenant": tenant, "limit": limit}
    if states:
        where.append("state = ANY(CAST(:states AS text[]))")
        params["states"] = list(states)
    if job_type:
        where.append("type = :type")
        params["type"] = job_type
    if labels:
        where.append("labels @> CAST(:labels AS jsonb)")
        params["labels"] = json.dumps(dict(labels))
    if after is not None:
        where.append("(created_at, id) < (CAST(:after_created AS timestamptz), :after_id)")
        params["after_created"], params["after_id"] = after
    sql = sa.text(
        f"SELECT * FROM jobs WHERE {' AND '.join(where)} "
        "ORDER BY created_at DESC, id DESC LIMIT :limit"
    ).columns(**_JOB_TYPES)
    result = await session.execute(sql, params)
    return [r._mapping for r in result]


# ---------------------------------------------------------------- transitions

# Every state change is a transition of control.store.machine.


async def _move(session: AsyncSession, name: str, args: dict[str, Any]) -> Row | None:
    """Transition `name` of the state machine on one job: its row, or None if the CAS lost."""
    row = (await session.execute(machine.STATEMENTS[name], args)).first()
    return row._mapping if row else None


async def cancel_queued_job(
    session: AsyncSession, tenant: str, job_id: uuid.UUID, attempt: int, reason: str = ""
) -> Row | None:
    """QUEUED → CANCELED at once; None when the job is no longer QUEUED at that attempt."""
    args = {"id": [job_id], "tenant": [tenant], "attempt": [attempt], "message": [reason]}
    return await _move(session, "cancel_queued", args)


async def request_cancel(
    session: AsyncSession, tenant: str, job_id: uuid.UUID, attempt: int, reason: str = ""
) -> Row | None:
    """Set cancel_requested on a RUNNING attempt; None if it is not running (or already asked).

    The worker holding it hears of it through spool_cancel and stops the handler;
    CANCELED follows from the worker (or from the grace-period enforcer).
    """
    args = {"id": [job_id], "tenant": [tenant], "attempt": [attempt], "message": [reason]}
    return await _move(session, "request_cancel", args)


async def retry_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> Row | None:
    """Requeue a FAILED or CANCELED job with a fresh budget; None if it is in another state."""
    args = {"id": [job_id], "tenant": [tenant], "message": [RETRY_MESSAGE]}
    return await _move(session, "retry", args)


# ---------------------------------------------------------------- delete + retention

_DELETE_SQL = sa.text(
    f"DELETE FROM jobs WHERE id = :id AND tenant = :tenant AND state IN {_TERMINAL_SQL} "
    "RETURNING id"
)


async def delete_terminal_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> bool:
    """Delete a terminal job (its events cascade); False if missing or not terminal."""
    res = await session.execute(_DELETE_SQL, {"id": job_id, "tenant": tenant})
    return res.first() is not None


# Oldest-first batch of expired terminal jobs (ix_jobs_finished); SKIP LOCKED
# so two replicas sweeping at once split the work instead of queueing.
_SWEEP_SQL = sa.text(
    f"""
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs
        WHERE state IN {_TERMINAL_SQL}
          AND finished_at < now() - CAST(:age_s AS double precision) * interval '1 second'
        ORDER BY finished_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED)
    """
)


async def delete_expired_jobs(session: AsyncSession, age_s: float, batch: int) -> int:
    """Delete up to `batch` terminal jobs finished more than `age_s` ago; returns how many."""
    res = await session.execute(_SWEEP_SQL, {"age_s": age_s, "batch": batch})
    return cast("sa.CursorResult[Any]", res).rowcount or 0


# ---------------------------------------------------------------- stats + workers

# Per (type, state): terminal states from the folded counts plus the deltas not
# folded yet (control.schema.job_counts), QUEUED and RUNNING counted live on their
# partial indexes (with the claimable queue's size and oldest job). Never a scan
# of the whole jobs table, however many finished jobs it holds.
_STATS_SQL_TEMPLATE = """
    SELECT type, state, sum(n)::bigint AS n, 0::bigint AS ready,
           CAST(NULL AS timestamptz) AS oldest, now() AS db_now
    FROM (SELECT type, state, n FROM job_counts {where}
          UNION ALL
          SELECT type, state, n FROM job_count_deltas {where}) AS t
    GROUP BY type, state HAVING sum(n) <> 0
    UNION ALL
    SELECT type, 'queued', count(*),
           count(*) FILTER (WHERE not_before <= now()),
           min(created_at) FILTER (WHERE not_before <= now()), now()
    FROM jobs WHERE state = 'queued' {and_tenant} GROUP BY type
    UNION ALL
    SELECT type, 'running', count(*), 0, CAST(NULL AS timestamptz), now()
    FROM jobs WHERE state = 'running' {and_tenant} GROUP BY type
"""
_STATS_SQL = sa.text(
    _STATS_SQL_TEMPLATE.format(where="WHERE tenant = :tenant", and_tenant="AND tenant = :tenant")
)
# The same over every tenant (the control plane's own metrics).
_STATS_ALL_TENANTS_SQL = sa.text(_STATS_SQL_TEMPLATE.format(where="", and_tenant=""))


async def job_stats(session: AsyncSession, tenant: str | None) -> list[Row]:
    """Per (type, state): n, ready (claimable queued), oldest (claimable), db_now.

    `tenant` None counts every tenant's jobs.
    """
    if tenant is None:
        res = await session.execute(_STATS_ALL_TENANTS_SQL)
    else:
        res = await session.execute(_STATS_SQL, {"tenant": tenant})
    return [r._mapping for r in res]


# Move the count deltas into job_counts, in one statement. Concurrent folds take
# disjoint deltas (a deleted row is skipped by the second DELETE), and the upsert
# locks counts in one order, so two replicas folding at once cannot deadlock.
_FOLD_COUNTS_SQL = sa.text(
    """
    WITH d AS (DELETE FROM job_count_deltas RETURNING tenant, type, state, n),
    s AS (SELECT tenant, type, state, sum(n) AS n FROM d GROUP BY tenant, type, state)
    INSERT INTO job_counts AS c (tenant, type, state, n)
    SELECT tenant, type, state, n FROM s ORDER BY tenant, type, state
    ON CONFLICT (tenant, type, state) DO UPDATE SET n = c.n + EXCLUDED.n
    """
)


async def fold_job_counts(session: AsyncSession) -> int:
    """Fold the pending count deltas into job_counts; how many (tenant, type, state) moved."""
    res = await session.execute(_FOLD_COUNTS_SQL)
    return cast("sa.CursorResult[Any]", res).rowcount or 0


async def db_now(session: AsyncSession) -> datetime:
    """The database's clock."""
    return (await session.execute(sa.text("SELECT now()"))).scalar_one()


async def count_connected_workers(session: AsyncSession) -> int:
    """Workers connected to any replica."""
    res = await session.execute(sa.text("SELECT count(*) FROM workers WHERE connected"))
    return int(res.scalar_one())


# Workers with the ids of the caller's jobs each is running.
_LIST_WORKERS_SQL = sa.text(
    """
    SELECT w.*,
           coalesce((SELECT array_agg(j.id::text ORDER BY j.started_at) FROM jobs AS j
                     WHERE j.worker_id = w.id AND j.state = 'running' AND j.tenant = :tenant),
                    ARRAY[]::text[]) AS running_job_ids
    FROM workers AS w
    WHERE (w.connected OR :include_disconnected) AND w.tenant IN (:tenant, '*')
    ORDER BY w.id
    """
).columns(**_WORKER_TYPES)


async def list_workers(
    session: AsyncSession, tenant: str, *, include_disconnected: bool = False
) -> list[Row]:
    """The tenant's workers and the shared fleet's (connected only, unless asked), with the
    tenant's running job ids."""
    res = await session.execute(
        _LIST_WORKERS_SQL, {"tenant": tenant, "include_disconnected": include_disconnected}
    )
    return [r._mapping for r in res]
