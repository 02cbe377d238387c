"""GetStats counts terminal jobs from job_counts + deltas (triggers on jobs), never by
scanning the table: after every kind of change the figures equal a real count."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from control_support import move, submit

from control.store import jobs as store
from spool.v1 import job_pb2, job_service_pb2

pb = job_service_pb2
S = job_pb2

_STATES = ("queued", "running", "succeeded", "failed", "canceled")


async def _real_counts(db, tenant: str = "acme") -> dict[tuple[str, str], int]:
    async with db.session() as s:
        rows = await s.execute(
            sa.text("SELECT type, state, count(*) FROM jobs WHERE tenant = :t GROUP BY 1, 2"),
            {"t": tenant},
        )
        return {(r[0], r[1]): r[2] for r in rows}


async def _stats_counts(jobs) -> dict[tuple[str, str], int]:
    stats = await jobs.GetStats(pb.GetStatsRequest())
    out = {}
    for job_type, per in stats.by_type.items():
        for state in _STATES:
            if getattr(per, state):
                out[(job_type, state)] = getattr(per, state)
    totals = {state: getattr(stats.totals, state) for state in _STATES}
    for state in _STATES:
        assert totals[state] == sum(n for (_, st), n in out.items() if st == state)
    return out


async def _fold(db) -> None:
    async with db.autocommit() as conn:
        await store.fold_job_counts(conn)


async def _check(jobs, db) -> None:
    """GetStats equals the real count, with the deltas pending and once folded."""
    assert await _stats_counts(jobs) == await _real_counts(db)
    await _fold(db)
    assert await _stats_counts(jobs) == await _real_counts(db)


async def test_stats_follow_every_kind_of_change(jobs, jobs_b, db) -> None:
    made = [await submit(jobs, "a") for _ in range(6)] + [await submit(jobs, "b")]
    await submit(jobs_b, "a")  # another tenant's job counts only for them
    await _check(jobs, db)
    a = [j.id for j in made[:6]]
    for job_id in a[:4]:
        await move(db, job_id, "queued", "running", attempt=1, worker_id="w")
    await move(db, a[0], "running", "succeeded", attempt=1)
    await move(db, a[1], "running", "failed", attempt=1, error={"code": "X"})
    await jobs.Cancel(pb.CancelRequest(job_id=a[4]))  # queued: canceled at once
    await _check(jobs, db)
    await jobs.Retry(pb.RetryRequest(job_id=a[1]))  # failed -> queued
    await jobs.Delete(pb.DeleteRequest(job_id=a[0]))  # a succeeded job goes
    await _check(jobs, db)
    # Many at once, in one statement each way (a batch inserted terminal, then deleted).
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant, type, max_attempts, state, finished_at) "
                "SELECT gen_random_uuid(), 'acme', 'bulk', 1, "
                "(ARRAY['succeeded', 'failed', 'canceled'])[1 + i % 3], now() "
                "FROM generate_series(1, 300) AS i"
            )
        )
    await _check(jobs, db)
    async with db.session() as s, s.begin():
        await s.execute(sa.text("DELETE FROM jobs WHERE type = 'bulk' AND state = 'failed'"))
    await _check(jobs, db)
    stats = await jobs.GetStats(pb.GetStatsRequest())
    assert stats.by_type["bulk"].succeeded == 100 and stats.by_type["bulk"].failed == 0
    assert stats.totals.canceled == 1 + 100


async def test_the_retention_sweeper_keeps_counts_right(jobs, db) -> None:
    job = await submit(jobs, "old")
    await move(db, job.id, "queued", "running", attempt=1, worker_id="w")
    await move(db, job.id, "running", "succeeded", attempt=1)
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text("UPDATE jobs SET finished_at = now() - interval '30 days' WHERE id = :id"),
            {"id": uuid.UUID(job.id)},
        )
    async with db.transaction() as conn:
        assert await store.delete_expired_jobs(conn, 86400, 100) == 1
    await _check(jobs, db)
    assert (await jobs.GetStats(pb.GetStatsRequest())).totals.succeeded == 0
