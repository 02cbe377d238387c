"""The claim query under concurrency, straight on Postgres (many transactions at once)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from control.db import Database, compile_clause
from control.store import dispatch as store
from control.store import machine


@pytest.fixture
async def db(database_url):
    database = Database(database_url, pool_size=20, max_overflow=20)
    try:
        yield database
    finally:
        await database.dispose()


async def _insert(db, n: int, **cols) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    async with db.session() as s, s.begin():
        for i, job_id in enumerate(ids):
            await s.execute(
                sa.text(
                    "INSERT INTO jobs (id, tenant, type, max_attempts, priority, concurrency_key,"
                    " concurrency_limit, min_start_interval_ms, created_at, not_before)"
                    " VALUES (:id, 't', 'x', 3, :priority, :key, :limit, :interval,"
                    " now() - interval '1 minute' + :i * interval '1 millisecond',"
                    " now() - interval '1 minute')"
                ),
                {
                    "id": job_id,
                    "i": i,
                    "priority": cols.get("priority", 0),
                    "key": cols.get("key"),
                    "limit": cols.get("limit", 0),
                    "interval": cols.get("interval_ms", 0),
                },
            )
    return ids


async def _claim(db, worker: str, limit: int) -> store.ClaimResult:
    async with db.session() as s, s.begin():
        args = store.claim_args(worker, ["x"], {}, limit, datetime.now(UTC), lease_s=30)
        return await store.claim_jobs(s, args)


async def _running(db) -> Counter:
    async with db.session() as s:
        rows = await s.execute(
            sa.text("SELECT coalesce(concurrency_key, '') FROM jobs WHERE state = 'running'")
        )
        return Counter(r[0] for r in rows)


async def test_concurrent_claims_take_disjoint_jobs(db):
    ids = await _insert(db, 100)
    results = await asyncio.gather(*(_claim(db, f"w{i}", 10) for i in range(12)))
    claimed = [str(j["id"]) for r in results for j in r.jobs]
    assert len(claimed) == len(set(claimed))
    # Skipped rows are not lost: a second round takes the rest.
    rest = await asyncio.gather(*(_claim(db, f"w{i}", 10) for i in range(12)))
    claimed += [str(j["id"]) for r in rest for j in r.jobs]
    assert sorted(claimed) == sorted(ids)
    async with db.session() as s:
        seqs = (await s.execute(sa.text("SELECT count(*) FROM job_events"))).scalar()
    assert seqs == 100  # one STATE(running) event each


async def test_concurrent_claims_never_pass_a_key_limit(db):
    await _insert(db, 30, key="cam", limit=2)
    await _insert(db, 5)
    for _ in range(3):
        await asyncio.gather(*(_claim(db, f"w{i}", 3) for i in range(16)))
        running = await _running(db)
        assert running["cam"] == 2
    assert running[""] == 5


async def test_min_start_interval_holds_across_concurrent_claims(db):
    await _insert(db, 10, key="api", interval_ms=60_000)
    results = await asyncio.gather(*(_claim(db, f"w{i}", 4) for i in range(10)))
    assert sum(len(r.jobs) for r in results) == 1
    retry_at = [r.retry_at for r in results if r.retry_at is not None]
    assert all(t > datetime.now(UTC) + timedelta(seconds=50) for t in retry_at)


async def test_saturated_key_does_not_starve_other_jobs(db):
    await _insert(db, 10, key="hot", limit=1, priority=50)
    plain = await _insert(db, 3)
    first = await _claim(db, "w", 4)
    assert [j["concurrency_key"] for j in first.jobs] == ["hot"]
    assert first.held_back
    second = await _claim(db, "w", 3)
    assert sorted(str(j["id"]) for j in second.jobs) == sorted(plain)


async def test_backoff_doubles_with_jitter_and_a_cap(db):
    # The one backoff of the state machine, evaluated by Postgres as the
    # transitions do (`j` is the job row).
    query = sa.text(
        f"SELECT {machine.BACKOFF_MS_SQL} AS ms"
        " FROM (SELECT CAST(:attempt AS int) AS attempt) AS j, generate_series(1, 200)"
    )
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 60.0), (30, 60.0)]:
        async with db.session() as s:
            args = {"attempt": attempt, "backoff_base_ms": 1000, "backoff_max_ms": 60_000}
            delays = [r.ms / 1000 for r in await s.execute(query, args)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert len(set(delays)) > 1  # jittered


async def _claim_plan(runner, args) -> str:
    c = compile_clause(store._CLAIM_SQL)
    plan = await runner.conn.fetch("EXPLAIN " + c.sql, *c.args(args))
    return "\n".join(r[0] for r in plan)


async def test_the_claim_walks_the_queue_index_even_with_stale_statistics(db):
    """A burst of submits into a table last analyzed empty: the claim still reads the
    head of the claim index in order instead of sorting every queued row."""
    async with db.autocommit() as s:
        await s.conn.execute("ANALYZE jobs")  # statistics of an empty table
        await s.conn.execute(
            "INSERT INTO jobs (id, tenant, type, max_attempts, created_at)"
            " SELECT gen_random_uuid(), 't', 'x', 3, now() + i * interval '1 microsecond'"
            " FROM generate_series(1, 20000) AS i"
        )
    args = store.claim_args("w", ["x"], {}, 10, datetime.now(UTC), lease_s=30)
    # (On its own, on the embedded Postgres, the planner reads every queued row and
    # sorts them with these statistics: the claim costs more the longer the queue.)
    async with db.claiming() as s:
        plan = await _claim_plan(s, args)
    assert "Index Scan using ix_jobs_claim on jobs j_1" in plan
    assert "Sort Key: j_1.priority DESC" not in plan
    async with db.claiming() as s:
        started, keyed = await store.claim_unkeyed(s, args)
    assert len(started) == 10 and not keyed
