"""The SQL of leases: what runs where, and the reapers that take work back.

Functions take a session and never commit. The reapers are transitions of the
state machine (control.store.machine): they lock the rows they move with SKIP
LOCKED and move a batch with one conditional UPDATE (bumping `last_seq`,
appending the STATE events, NOTIFYing in the same statement), so every replica
can run them at once and a job is still moved only once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.store import machine
from control.store.dispatch import Transition, ms, transition_from_row

# Error codes the control plane sets itself (JobError.code).
LEASE_EXPIRED = "LEASE_EXPIRED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
WORKER_LOST = "WORKER_LOST"

# Reapers work in bounded batches so one transaction never locks half the table.
REAP_BATCH = 500

# The cancel sweep's safety net: attempts of these workers that should be stopped.
_TO_CANCEL_OF_WORKERS_SQL = sa.text(
    """
    SELECT id, attempt, worker_id
    FROM jobs
    WHERE state = 'running' AND worker_id = ANY(CAST(:worker_ids AS text[]))
      AND (cancel_requested OR deadline_at <= CAST(:now AS timestamptz))
    """
)


async def attempts_to_cancel(
    session: AsyncSession, worker_ids: Sequence[str], now: datetime
) -> list[Any]:
    """RUNNING attempts of these workers whose cancel was requested or whose deadline
    passed: (id, attempt, worker_id) rows."""
    if not worker_ids:
        return []
    rows = await session.execute(
        _TO_CANCEL_OF_WORKERS_SQL, {"worker_ids": list(worker_ids), "now": now}
    )
    return list(rows)


_ATTEMPT_STATUS_SQL = sa.text(
    """
    SELECT id, state, attempt, worker_id, cancel_requested,
           deadline_at IS NOT NULL AND deadline_at <= CAST(:now AS timestamptz) AS overdue
    FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))
    """
)


async def attempts_to_stop(
    session: AsyncSession,
    worker_id: str,
    refs: Iterable[tuple[str, int]],
    now: datetime,
) -> set[tuple[str, int]]:
    """Which of a worker's attempts it should stop: cancel requested, deadline
    passed, or no longer RUNNING as that attempt on that worker."""
    refs = set(refs)
    if not refs:
        return set()
    rows = await session.execute(
        _ATTEMPT_STATUS_SQL, {"ids": sorted({r[0] for r in refs}), "now": now}
    )
    current = {str(r.id): r for r in rows}
    stop = set()
    for job_id, attempt in refs:
        r = current.get(job_id)
        if (
            r is None
            or (r.state, r.attempt, r.worker_id) != ("running", attempt, worker_id)
            or r.cancel_requested
            or r.overdue
        ):
            stop.add((job_id, attempt))
    return stop


# ---------------------------------------------------------------------- reapers

# The reapers are transitions of control.store.machine that pick their rows
# (RUNNING rows matching a condition, skipping rows another replica's reaper or
# a worker message holds: their transition is in flight), then move each to
# QUEUED (attempt + 1) while attempts are left, else FAILED; a job whose cancel
# was requested becomes CANCELED instead. They tell the holder to stop
# (spool_cancel) and idle workers that work is back (spool_jobs).


def _error_json(code: str, message: str, retryable: bool = True) -> str:
    return json.dumps({"code": code, "message": message, "retryable": retryable})


async def _reap(session: AsyncSession, name: str, args: dict[str, Any]) -> list[Transition]:
    rows = await session.execute(machine.STATEMENTS[name], args)
    return [transition_from_row(r) for r in rows]


async def reap_expired_leases(
    session: AsyncSession, now: datetime, *, replica: str, batch: int = REAP_BATCH
) -> list[Transition]:
    """RUNNING attempts whose lease passed → QUEUED (attempt + 1, at once) or FAILED.

    Only attempts whose worker is disconnected, or connected through `replica` (the
    caller): a worker on another replica is judged there, or once marked stale
    (`control.store.workers.mark_stale_disconnected`). A lost lease is not the
    job's fault, so the retry starts without backoff.
    """
    args = {
        "now": now,
        "replica": replica,
        "batch": batch,
        "backoff_base_ms": 0,
        "backoff_max_ms": 0,
        "error": _error_json(LEASE_EXPIRED, "the worker stopped renewing its lease"),
    }
    return await _reap(session, "reap_lease", args)


async def reap_deadlines(
    session: AsyncSession,
    now: datetime,
    *,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    batch: int = REAP_BATCH,
) -> list[Transition]:
    """RUNNING attempts past their timeout → QUEUED (with backoff) or FAILED,
    error DEADLINE_EXCEEDED; the NOTIFY on spool_cancel makes the worker stop it."""
    args = {
        "now": now,
        "batch": batch,
        "backoff_base_ms": ms(backoff_base_s),
        "backoff_max_ms": ms(backoff_max_s),
        "error": _error_json(DEADLINE_EXCEEDED, "the attempt ran past its timeout"),
    }
    return await _reap(session, "reap_deadline", args)


async def requeue_lost_attempts(
    session: AsyncSession,
    worker_id: str,
    still_running: Iterable[tuple[str, int]],
    now: datetime,
) -> list[Transition]:
    """On reconnect: the worker's RUNNING attempts it no longer reports are lost
    (it restarted) → QUEUED (attempt + 1, at once) or FAILED, error WORKER_LOST."""
    refs = list(still_running)
    args = {
        "now": now,
        "batch": REAP_BATCH,
        "worker_id": worker_id,
        "ids": [r[0] for r in refs],
        "attempts": [r[1] for r in refs],
        "backoff_base_ms": 0,
        "backoff_max_ms": 0,
        "error": _error_json(WORKER_LOST, "the worker restarted without this attempt"),
    }
    return await _reap(session, "requeue_lost", args)


async def force_cancel_overdue(
    session: AsyncSession, now: datetime, *, grace_s: float, batch: int = REAP_BATCH
) -> list[Transition]:
    """RUNNING jobs whose cancel was requested more than `grace_s` ago → CANCELED."""
    return await _reap(
        session, "force_cancel", {"now": now, "grace_ms": ms(grace_s), "batch": batch}
    )


#: SET value giving a running attempt a lease of at least :lease_ms from :now
LEASE_AT_LEAST_SQL = (
    "greatest(lease_expires_at, CAST(:now AS timestamptz) + :lease_ms * interval '1 millisecond')"
)

# After the database was unreachable: every running attempt gets at least one
# more lease from now (heartbeats could not land meanwhile, so a lease that ran
# out then says nothing about its worker).
_EXTEND_RUNNING_SQL = sa.text(
    f"UPDATE jobs SET lease_expires_at = {LEASE_AT_LEAST_SQL} WHERE state = 'running'"
)


async def extend_running_leases(session: AsyncSession, now: datetime, *, lease_s: float) -> int:
    """Give every RUNNING attempt a lease of at least `lease_s` from `now`; returns how many."""
    result = await session.execute(_EXTEND_RUNNING_SQL, {"now": now, "lease_ms": ms(lease_s)})
    return int(getattr(result, "rowcount", 0) or 0)
