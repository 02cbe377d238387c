"""The SQL of dispatch: claiming jobs for workers and every transition a worker causes.

Each function takes a session and never commits: the caller (a worker stream or
a background task) owns the transaction. Every state change is one conditional
UPDATE (compare-and-set on state, attempt and, for worker messages, the worker
id) that also bumps `jobs.last_seq`, appends the matching `job_events` row and
issues `pg_notify('spool_events', <job id>)` in the same statement, so a racing
writer loses cleanly and a watcher always finds the event it was told about.

Times come in as `now` from the caller (replicas are expected to keep their
clocks in sync, as with any lease-based system); durations are milliseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.schema import jobs
from control.store import machine
from control.store.events import EVENT_TYPES

log = logging.getLogger(__name__)

# The statements below write job_events.kind 'state', 'progress' and 'ignored'
# (JOB_EVENT_KIND_*; the same values as control.store.jobs).

# Result columns of queries returning whole job rows, typed so JSONB decodes.
_JOB_COLUMN_TYPES = {c.name: c.type for c in jobs.c}


#: a jobs row as returned by the claim (column name → value)
JobRow = Mapping[Any, Any]


@dataclass
class ClaimResult:
    """What one claim produced for one worker."""

    #: the jobs now RUNNING on the worker (full rows, JSONB decoded)
    jobs: list[JobRow] = field(default_factory=list)
    #: True when some candidates were held back by their concurrency key, so a
    #: second claim may find other work for the credits left.
    held_back: bool = False
    #: earliest moment a held-back key's minimum start interval ends
    retry_at: datetime | None = None


@dataclass(frozen=True)
class Transition:
    """One job moved by a worker message or a reaper."""

    job_id: str
    job_type: str
    state: str
    attempt: int
    worker_id: str | None
    #: the statement's row, which carries the event it appended (`machine.event_of`)
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def event(self) -> dict[str, Any]:
        """The event the transition appended, as `job_events` reads it back."""
        return machine.event_of(self.row)


def ms(td: timedelta | float) -> int:
    """A duration (timedelta or seconds) in whole milliseconds, as the schema stores them."""
    if isinstance(td, timedelta):
        return int(td.total_seconds() * 1000)
    return int(td * 1000)


# --------------------------------------------------------------------------- claim

#: the longest attempt timeout a claim computes a deadline from (Submit refuses longer)
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000

# What starting an attempt sets, its event and its wake-ups, in both claim
# statements below (`j` is the job row): the claim transition of the state machine.
_START_SET, _START_EVENT, _START_NOTES = machine.start_sql()

# Lock the best claimable jobs for this worker.
#
# Why SKIP LOCKED is safe: a row locked by another transaction is being claimed
# (or moved) by someone else right now; skipping it only means this worker takes
# the next-best job instead of queueing behind that lock. Nothing is lost: if
# the other transaction rolls back, the row stays QUEUED and the next claim (woken
# by NOTIFY or the safety-net poll) sees it. The state = 'queued' filter is
# re-checked on the locked row (READ COMMITTED re-evaluates WHERE after locking),
# so a row that another claim already moved to RUNNING is never claimed twice.
#
# Unkeyed candidates are started in the same statement (the common case: one
# round trip). Candidates with a concurrency key are only locked here; they are
# started by `start_keyed` after their key rows are locked, because the
# running count read below is a snapshot that another replica may be about to
# change. The key filters here are a cheap pre-filter against starvation (jobs of
# a saturated key must not fill the LIMIT); the decisive check comes later.
_CLAIM_SQL = sa.text(
    f"""
    WITH cand AS (
        SELECT j.id, coalesce(j.concurrency_key, '') <> '' AS keyed
        FROM jobs AS j
        WHERE j.state = 'queued'
          AND j.not_before <= CAST(:now AS timestamptz)
          AND j.type = ANY(CAST(:types AS text[]))
          AND j.worker_selector <@ CAST(:labels AS jsonb)
          AND (CAST(:tenants AS text[]) IS NULL OR j.tenant = ANY(CAST(:tenants AS text[])))
          AND (CAST(:only_id AS uuid) IS NULL OR j.id = CAST(:only_id AS uuid))
          AND (
            coalesce(j.concurrency_key, '') = ''
            OR (
              (j.concurrency_limit <= 0 OR (
                SELECT count(*) FROM jobs AS r
                WHERE r.state = 'running' AND r.tenant = j.tenant
                  AND r.concurrency_key = j.concurrency_key
              ) < j.concurrency_limit)
              AND (j.min_start_interval_ms <= 0 OR NOT EXISTS (
                SELECT 1 FROM concurrency_keys AS k
                WHERE k.tenant = j.tenant AND k.key = j.concurrency_key
                  AND k.last_started_at > CAST(:now AS timestamptz)
                      - j.min_start_interval_ms * interval '1 millisecond'
              ))
            )
          )
        ORDER BY j.priority DESC, j.created_at, j.id
        LIMIT :limit
        FOR UPDATE OF j SKIP LOCKED
    ),
    started AS (
        UPDATE jobs AS j SET
{_START_SET}
        FROM cand
        WHERE j.id = cand.id AND NOT cand.keyed
        RETURNING j.*
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, state, attempt, worker_id, created_at)
        SELECT {_START_EVENT} FROM started
    ),
    notes AS (
        {_START_NOTES}
    )
    SELECT started.*, true AS started, (SELECT count(*) FROM notes) AS notified
    FROM started
    UNION ALL
    SELECT j.*, false, 0
    FROM jobs AS j JOIN cand ON cand.id = j.id
    WHERE cand.keyed
    """
).columns(**_JOB_COLUMN_TYPES)

# Lock (creating when missing) the concurrency_keys rows of the keys involved,
# in a fixed order so two claims never deadlock. Every transition that makes a
# keyed job RUNNING holds its key row's lock, so once we hold it nobody else can
# start a job of that key until we commit. ON CONFLICT DO UPDATE reads the
# latest committed version, so last_started_at is current.
_LOCK_KEYS_SQL = sa.text(
    """
    INSERT INTO concurrency_keys (tenant, key)
    SELECT t, k FROM unnest(CAST(:tenants AS text[]), CAST(:keys AS text[])) AS u(t, k)
    ORDER BY t, k
    ON CONFLICT (tenant, key) DO UPDATE SET key = EXCLUDED.key
    RETURNING tenant, key, last_started_at
    """
)

# Running counts per key, read in a new statement (a new snapshot) after the key
# locks are held, so it includes every start committed before ours.
_RUNNING_PER_KEY_SQL = sa.text(
    """
    SELECT tenant, concurrency_key AS key, count(*) AS running
    FROM jobs
    WHERE state = 'running'
      AND (tenant, concurrency_key) IN (
        SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:keys AS text[])))
    GROUP BY tenant, concurrency_key
    """
)

# Start the chosen keyed candidates (already row-locked by this transaction) and
# stamp their keys' last start.
_START_KEYED_SQL = sa.text(
    f"""
    WITH started AS (
        UPDATE jobs AS j SET
{_START_SET}
        WHERE j.id = ANY(CAST(:ids AS uuid[])) AND j.state = 'queued'
          AND j.not_before <= CAST(:now AS timestamptz)
        RETURNING j.*
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, state, attempt, worker_id, created_at)
        SELECT {_START_EVENT} FROM started
    ),
    notes AS (
        {_START_NOTES}
    ),
    stamp AS (
        UPDATE concurrency_keys AS k SET last_started_at = CAST(:now AS timestamptz)
        FROM (SELECT DISTINCT tenant, concurrency_key FROM started) AS s
        WHERE k.tenant = s.tenant AND k.key = s.concurrency_key
    )
    SELECT started.*, (SELECT count(*) FROM notes) AS notified
    FROM started
    """
).columns(**_JOB_COLUMN_TYPES)


def claim_args(
    worker_id: str,
    job_types: Sequence[str],
    worker_labels: Mapping[str, str],
    limit: int,
    now: datetime,
    *,
    lease_s: float,
    tenants: Sequence[str] | None = None,
    only_id: str | None = None,
) -> dict[str, Any]:
    """The parameters of one claim (see `claim_jobs`)."""
    return {
        "now": now,
        "types": list(job_types),
        "labels": json.dumps(dict(worker_labels)),
        "tenants": list(tenants) if tenants is not None else None,
        "only_id": only_id,
        "limit": limit,
        "worker_id": worker_id,
        "lease_ms": ms(lease_s),
        "max_timeout_ms": MAX_TIMEOUT_MS,
    }


async def claim_unkeyed(
    session: AsyncSession, args: Mapping[str, Any]
) -> tuple[list[JobRow], list[JobRow]]:
    """The claim statement: (jobs started, keyed candidates for `start_keyed`).

    One statement, so it may run on an autocommit connection: the unkeyed
    jobs it starts are then committed RUNNING when it returns. The keyed
    candidates are only locked for the rest of a transaction; outside one,
    `start_keyed` re-checks each under its own row lock, so a candidate that
    another claim took in between is simply not started.
    """
    if args["limit"] <= 0 or not args["types"]:
        return [], []
    rows = (await session.execute(_CLAIM_SQL, args)).mappings().all()
    return [r for r in rows if r["started"]], [r for r in rows if not r["started"]]


async def claim_jobs(session: AsyncSession, args: Mapping[str, Any]) -> ClaimResult:
    """Claim for a worker (`claim_args`) and mark the jobs RUNNING, in the caller's transaction.

    Best priority first, then oldest; only the worker's job types, only jobs
    whose `worker_selector` is a subset of the worker's labels, only jobs whose
    `not_before` has passed, only the `tenants` given (None: any tenant, a
    shared fleet); per (tenant, concurrency key) at most `concurrency_limit`
    running and starts at least `min_start_interval` apart, race-free across
    replicas. One round trip when no candidate has a key. `only_id` narrows the
    claim to one job (to find a job that makes claims fail, see
    `claim_candidates`). The dispatcher runs the two steps on their own
    (`claim_unkeyed` on an autocommit connection, then `start_keyed`).
    """
    result = ClaimResult()
    result.jobs, keyed = await claim_unkeyed(session, args)
    if keyed:
        started, result.retry_at = await start_keyed(session, keyed, args)
        result.jobs.extend(started)
        result.held_back = len(started) < len(keyed)
    return result


async def start_keyed(
    session: AsyncSession, candidates: Sequence[JobRow], args: dict[str, Any]
) -> tuple[list[JobRow], datetime | None]:
    """Start the keyed candidates their keys still allow, under the keys' row locks.

    Runs in a transaction (the key locks must be held until its commit).
    """
    now: datetime = args["now"]
    keys = sorted({(c["tenant"], c["concurrency_key"]) for c in candidates})
    key_args = {"tenants": [t for t, _ in keys], "keys": [k for _, k in keys]}
    last_started = {
        (r.tenant, r.key): r.last_started_at
        for r in await session.execute(_LOCK_KEYS_SQL, key_args)
    }
    running = {
        (r.tenant, r.key): r.running for r in await session.execute(_RUNNING_PER_KEY_SQL, key_args)
    }
    chosen: list[str] = []
    retry_at: datetime | None = None
    # Candidates arrive in claim order, so the best ones of each key win.
    for cand in candidates:
        key = (cand["tenant"], cand["concurrency_key"])
        limit = cand["concurrency_limit"]
        if limit > 0 and running.get(key, 0) >= limit:
            continue
        interval = timedelta(milliseconds=cand["min_start_interval_ms"])
        last = last_started.get(key)
        if interval and last is not None and last + interval > now:
            opens = last + interval
            retry_at = opens if retry_at is None else min(retry_at, opens)
            continue
        chosen.append(str(cand["id"]))
        running[key] = running.get(key, 0) + 1
        last_started[key] = now
    if not chosen:
        return [], retry_at
    rows = await session.execute(_START_KEYED_SQL, {**args, "ids": chosen})
    return list(rows.mappings().all()), retry_at


# The attempts one claim statement started: its worker and its `now` (started_at)
# name them exactly. Only ids and numbers come back, so reading them cannot fail.
_STARTED_BY_CLAIM_SQL = sa.text(
    """
    SELECT id, attempt FROM jobs
    WHERE worker_id = :worker_id AND state = 'running' AND started_at = CAST(:now AS timestamptz)
    """
)


async def started_by_claim(
    session: AsyncSession, worker_id: str, now: datetime
) -> list[tuple[str, int]]:
    """(job_id, attempt) of the jobs a claim at `now` started for the worker (still RUNNING)."""
    rows = await session.execute(_STARTED_BY_CLAIM_SQL, {"worker_id": worker_id, "now": now})
    return [(str(r.id), r.attempt) for r in rows]


# The ids a claim would consider first, without touching them: when a claim
# statement fails, the dispatcher tries these one at a time to find the job whose
# stored values break it (and quarantines that job alone).
_CANDIDATES_SQL = sa.text(
    """
    SELECT j.id FROM jobs AS j
    WHERE j.state = 'queued'
      AND j.not_before <= CAST(:now AS timestamptz)
      AND j.type = ANY(CAST(:types AS text[]))
      AND j.worker_selector <@ CAST(:labels AS jsonb)
      AND (CAST(:tenants AS text[]) IS NULL OR j.tenant = ANY(CAST(:tenants AS text[])))
    ORDER BY j.priority DESC, j.created_at, j.id
    LIMIT :limit
    """
)


async def claim_candidates(
    session: AsyncSession,
    job_types: Sequence[str],
    worker_labels: Mapping[str, str],
    now: datetime,
    *,
    tenants: Sequence[str] | None,
    limit: int,
) -> list[str]:
    """The ids of the first QUEUED jobs a claim with these filters would look at."""
    args = {
        "types": list(job_types),
        "labels": json.dumps(dict(worker_labels)),
        "tenants": list(tenants) if tenants is not None else None,
        "now": now,
        "limit": limit,
    }
    return [str(r.id) for r in await session.execute(_CANDIDATES_SQL, args)]


async def quarantine_job(
    session: AsyncSession, job_id: str, error: Mapping[str, Any], now: datetime
) -> Transition | None:
    """QUEUED → FAILED for a job that breaks the claim statement (its time columns reset
    to values any reader can decode, so Get, List and Delete work on it again); None if
    it moved meanwhile."""
    args = {"id": [job_id], "error": [json.dumps(dict(error))], "now": now}
    row = (await session.execute(machine.STATEMENTS["quarantine"], args)).first()
    return transition_from_row(row) if row is not None else None


_NEXT_DUE_SQL = sa.text(
    """
    SELECT min(greatest(
        j.not_before,
        CASE WHEN j.min_start_interval_ms > 0 AND k.last_started_at IS NOT NULL
             THEN k.last_started_at + j.min_start_interval_ms * interval '1 millisecond'
             ELSE j.not_before END)) AS due
    FROM jobs AS j
    LEFT JOIN concurrency_keys AS k ON k.tenant = j.tenant AND k.key = j.concurrency_key
    WHERE j.state = 'queued' AND j.type = ANY(CAST(:types AS text[]))
      AND (j.not_before > CAST(:now AS timestamptz)
           OR k.last_started_at + j.min_start_interval_ms * interval '1 millisecond'
              > CAST(:now AS timestamptz))
    """
)


async def next_due_at(
    session: AsyncSession, job_types: Iterable[str], now: datetime
) -> datetime | None:
    """When the next QUEUED job now held back by `not_before` or a key's start interval
    becomes claimable (None if there is none): the dispatcher wakes at that moment."""
    row = await session.execute(_NEXT_DUE_SQL, {"types": list(job_types), "now": now})
    return row.scalar()


# ------------------------------------------------------------- worker transitions

# Every worker outcome is a transition of control.store.machine, applied to a
# whole batch of attempts in one statement. Its compare-and-set: the job must
# still be RUNNING this very attempt on this very worker, else the message is
# stale and is refused (recorded as IGNORED).

# Fencing: a refused message changes nothing but the job's history, where it is
# appended as an IGNORED event (if the job still exists) — at most
# MAX_IGNORED_EVENTS_PER_ATTEMPT of them per attempt (one per job per
# statement), so a zombie or a worker resending a stale outcome cannot grow a
# job's history without limit.
_IGNORED_SQL = sa.text(
    f"""
    WITH t AS (
        SELECT DISTINCT ON (x.id) x.id, x.attempt, x.message
        FROM unnest(CAST(:id AS uuid[]), CAST(:attempt AS int[]), CAST(:message AS text[]))
             AS x(id, attempt, message)
        WHERE (SELECT count(*) FROM job_events AS e
               WHERE e.job_id = x.id AND e.kind = 'ignored' AND e.attempt = x.attempt)
              < :max_events
        ORDER BY x.id
    ),
    u AS (
        UPDATE jobs AS j SET last_seq = j.last_seq + 1
        FROM t WHERE j.id = t.id
        RETURNING j.id, j.last_seq, t.attempt, t.message
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, attempt, worker_id, message, created_at)
        SELECT id, last_seq, 'ignored', attempt, :worker_id, message, CAST(:now AS timestamptz)
        FROM u
    ),
    notes AS (
        {machine.notify_sql(machine.EVENTS, "u")}
    )
    SELECT u.id, u.attempt, (SELECT count(*) FROM notes) AS notified FROM u
    """
)

#: IGNORED events kept per (job, attempt); later refusals are only logged and counted
MAX_IGNORED_EVENTS_PER_ATTEMPT = 3


def transition_from_row(row: Any) -> Transition:
    """A RETURNING row (id, type, state, attempt, and prev_worker or worker_id)."""
    m = row._mapping
    return Transition(
        job_id=str(m["id"]),
        job_type=m["type"],
        state=m["state"],
        attempt=m["attempt"],
        worker_id=m["prev_worker"] if "prev_worker" in m else m["worker_id"],
        row=m,
    )


async def record_ignored(
    session: AsyncSession,
    job_id: str,
    attempt: int,
    worker_id: str,
    message: str,
    now: datetime,
) -> bool:
    """Log a refused (stale or late) worker message and append it as an IGNORED event.

    Returns False when the attempt already has MAX_IGNORED_EVENTS_PER_ATTEMPT of
    them (or the job is gone): the refusal is then only logged.
    """
    return bool(await record_ignored_many(session, worker_id, [(job_id, attempt, message)], now))


async def record_ignored_many(
    session: AsyncSession,
    worker_id: str,
    refused: Sequence[tuple[str, int, str]],
    now: datetime,
) -> set[tuple[str, int]]:
    """`record_ignored` for many (job_id, attempt, message) in one statement; the refs recorded."""
    if not refused:
        return set()
    for job_id, attempt, message in refused:
        log.info("ignored from worker %s: job %s attempt %d: %s", worker_id, job_id, attempt,
                 message)  # fmt: skip
    args = {
        "id": [r[0] for r in refused],
        "attempt": [r[1] for r in refused],
        "message": [r[2] for r in refused],
        "worker_id": worker_id,
        "now": now,
        "max_events": MAX_IGNORED_EVENTS_PER_ATTEMPT,
    }
    return {(str(r.id), r.attempt) for r in await session.execute(_IGNORED_SQL, args)}


async def _apply(
    session: AsyncSession,
    name: str,
    worker_id: str,
    rows: Sequence[dict[str, Any]],
    now: datetime,
    what: str,
    **args: Any,
) -> list[Transition | None]:
    """Apply worker transition `name` to many attempts; one Transition (or None) per row.

    A row whose compare-and-set lost (stale attempt, another worker, not
    running), or that repeats an earlier row's attempt, is refused and
    recorded as IGNORED.
    """
    if not rows:
        return []
    firsts: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        firsts.setdefault((r["id"], r["attempt"]), r)
    cols = ["id", *machine.TRANSITIONS[name].inputs]
    unique = list(firsts.values())
    params = {c: [r[c] for r in unique] for c in cols}
    result = await session.execute(machine.STATEMENTS[name], {**params, **args, "now": now})
    moved = {(str(r.id), r.in_attempt): transition_from_row(r) for r in result}
    out: list[Transition | None] = []
    taken: set[tuple[str, int]] = set()
    for r in rows:
        ref = (r["id"], r["attempt"])
        got = moved.get(ref) if ref not in taken and firsts[ref] is r else None
        taken.add(ref)
        out.append(got)
    stale = f"{what} for an attempt that is not running on this worker"
    refused = [(r["id"], r["attempt"], stale) for r, t in zip(rows, out, strict=True) if t is None]
    await record_ignored_many(session, worker_id, refused, now)
    return out


async def complete_attempts(
    session: AsyncSession,
    worker_id: str,
    items: Sequence[tuple[str, int, Mapping[str, Any] | None, Sequence[str]]],
    now: datetime,
) -> list[Transition | None]:
    """(job_id, attempt, result, outputs) of many: RUNNING → SUCCEEDED (CANCELED if a
    cancel was requested); None where refused."""
    rows = [
        {
            "id": job_id,
            "attempt": attempt,
            "worker_id": worker_id,
            "result": json.dumps(dict(result or {})),
            "outputs": json.dumps(list(outputs)),
        }
        for job_id, attempt, result, outputs in items
    ]
    return await _apply(session, "complete", worker_id, rows, now, "completion")


async def complete_attempt(
    session: AsyncSession,
    job_id: str,
    attempt: int,
    worker_id: str,
    result: Mapping[str, Any] | None,
    outputs: Sequence[str],
    now: datetime,
) -> Transition | None:
    """RUNNING → SUCCEEDED (or CANCELED if cancel was requested); None when refused."""
    items = [(job_id, attempt, result, outputs)]
    return (await complete_attempts(session, worker_id, items, now))[0]


def _backoff_args(base_s: float, max_s: float) -> dict[str, int]:
    return {"backoff_base_ms": ms(base_s), "backoff_max_ms": ms(max_s)}


async def fail_attempts(
    session: AsyncSession,
    worker_id: str,
    items: Sequence[tuple[str, int, Mapping[str, Any], float | None]],
    now: datetime,
    *,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
) -> list[Transition | None]:
    """(job_id, attempt, error, retry_delay_s) of many: RUNNING → QUEUED (retry) | FAILED |
    CANCELED; None where refused.

    `error` is the JobError as a dict (code, message, retryable); a retry waits
    the handler's `retry_delay_s` when given (at most `backoff_max_s`), else the
    state machine's backoff (control.store.machine.BACKOFF_MS_SQL).
    """
    rows = [
        {
            "id": job_id,
            "attempt": attempt,
            "worker_id": worker_id,
            "retryable": bool(error.get("retryable")),
            "error": json.dumps(dict(error)),
            "delay_ms": ms(min(delay, backoff_max_s)) if delay is not None and delay > 0 else None,
        }
        for job_id, attempt, error, delay in items
    ]
    return await _apply(
        session, "fail", worker_id, rows, now, "failure",
        **_backoff_args(backoff_base_s, backoff_max_s),
    )  # fmt: skip


async def fail_attempt(
    session: AsyncSession,
    job_id: str,
    attempt: int,
    worker_id: str,
    error: Mapping[str, Any],
    now: datetime,
    *,
    retry_delay_s: float | None = None,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
) -> Transition | None:
    """RUNNING → QUEUED (retry with backoff) | FAILED | CANCELED; None when refused."""
    moved = await fail_attempts(
        session, worker_id, [(job_id, attempt, error, retry_delay_s)], now,
        backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
    )  # fmt: skip
    return moved[0]


async def confirm_canceled_many(
    session: AsyncSession, worker_id: str, items: Sequence[tuple[str, int]], now: datetime
) -> list[Transition | None]:
    """RUNNING with cancel requested → CANCELED (the worker confirmed); None where refused."""
    rows = [{"id": j, "attempt": a, "worker_id": worker_id} for j, a in items]
    return await _apply(session, "confirm_canceled", worker_id, rows, now, "cancel confirmation")


async def confirm_canceled(
    session: AsyncSession, job_id: str, attempt: int, worker_id: str, now: datetime
) -> Transition | None:
    """RUNNING with cancel requested → CANCELED (the worker confirmed); None when refused."""
    return (await confirm_canceled_many(session, worker_id, [(job_id, attempt)], now))[0]


async def release_attempts(
    session: AsyncSession,
    worker_id: str,
    items: Sequence[tuple[str, int, str]],
    now: datetime,
    *,
    by: str = "worker",
) -> list[Transition | None]:
    """(job_id, attempt, reason) of many: RUNNING → QUEUED at once, attempt + 1 without
    spending the budget (CANCELED if a cancel was requested); None where refused.

    `by` says who handed it back in the event message ("worker", or "control" for
    an assignment that never left a closing stream).
    """
    rows = [
        {
            "id": job_id,
            "attempt": attempt,
            "worker_id": worker_id,
            "message": f"released by {by}: {reason}" if reason else f"released by {by}",
        }
        for job_id, attempt, reason in items
    ]
    return await _apply(session, "release", worker_id, rows, now, "release")


async def release_attempt(
    session: AsyncSession,
    job_id: str,
    attempt: int,
    worker_id: str,
    reason: str,
    now: datetime,
    *,
    by: str = "worker",
) -> Transition | None:
    """RUNNING → QUEUED at once, attempt + 1 without spending the budget; None when refused."""
    return (await release_attempts(session, worker_id, [(job_id, attempt, reason)], now, by=by))[0]


# Progress of many attempts of one worker in one statement: a CAS per row on
# (running, attempt, worker), a PROGRESS event each, one NOTIFY per NOTIFY_IDS jobs;
# the events come back for this replica's own watchers.
_PROGRESS_SQL = sa.text(
    f"""
    WITH p AS (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]),
                             CAST(:progress AS text[])) AS p(id, attempt, progress)
    ),
    u AS (
        UPDATE jobs AS j SET
            progress = CAST(p.progress AS jsonb),
            updated_at = CAST(:now AS timestamptz),
            last_seq = j.last_seq + 1
        FROM p
        WHERE j.id = p.id AND j.attempt = p.attempt AND j.state = 'running'
          AND j.worker_id = :worker_id
        RETURNING j.id, j.attempt, j.progress, j.last_seq
    ),
    events AS (
        INSERT INTO job_events (job_id, seq, kind, attempt, progress, worker_id, created_at)
        SELECT id, last_seq, 'progress', attempt, progress, :worker_id, CAST(:now AS timestamptz)
        FROM u
        RETURNING *
    ),
    notes AS (
        {machine.notify_sql(machine.EVENTS, "events", key="job_id::text")}
    )
    SELECT e.* FROM events AS e WHERE (SELECT count(*) FROM notes) IS NOT NULL
    """
).columns(**EVENT_TYPES)


async def write_progress(
    session: AsyncSession,
    worker_id: str,
    updates: Sequence[tuple[str, int, Mapping[str, Any]]],
    now: datetime,
) -> list[Mapping[str, Any]]:
    """Store the latest progress of several (job_id, attempt) of one worker.

    Returns the PROGRESS events appended; updates for attempts that are no longer
    running on this worker are dropped silently (progress is not worth an IGNORED
    event).
    """
    if not updates:
        return []
    args = {
        "ids": [u[0] for u in updates],
        "attempts": [u[1] for u in updates],
        "progress": [json.dumps(dict(u[2])) for u in updates],
        "worker_id": worker_id,
        "now": now,
    }
    return [r._mapping for r in await session.execute(_PROGRESS_SQL, args)]


_EXTEND_SQL = sa.text(
    """
    UPDATE jobs AS j SET
        lease_expires_at = CAST(:now AS timestamptz) + :lease_ms * interval '1 millisecond'
    WHERE j.state = 'running' AND j.worker_id = :worker_id
      AND (j.id, j.attempt) IN (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])))
    RETURNING j.id, j.attempt
    """
)


async def extend_leases(
    session: AsyncSession,
    worker_id: str,
    refs: Iterable[tuple[str, int]],
    now: datetime,
    *,
    lease_s: float,
) -> set[tuple[str, int]]:
    """Extend the leases of a worker's running attempts; returns the refs extended.

    A ref not returned is no longer this worker's (finished, reaped, cancelled or
    re-run elsewhere): the caller tells the worker to stop it.
    """
    refs = list(refs)
    if not refs:
        return set()
    args = {
        "ids": [r[0] for r in refs],
        "attempts": [r[1] for r in refs],
        "worker_id": worker_id,
        "now": now,
        "lease_ms": ms(lease_s),
    }
    return {(str(r.id), r.attempt) for r in await session.execute(_EXTEND_SQL, args)}
