"""Whose expired lease the reaper takes: a worker connected through another replica is
not judged by its lease alone (that replica may have died, and with it the heartbeats);
once the worker is marked stale it gets one more lease to reconnect, then is reaped."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from control.store import leases
from control.store import workers as workers_store

LEASE_S = 3.0


async def _worker(db, worker_id: str, *, replica: str, connected: bool, heard: datetime) -> None:
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO workers (id, connected, control_replica, connected_at,"
                " last_heartbeat_at) VALUES (:id, :connected, :replica, :heard, :heard)"
            ),
            {"id": worker_id, "connected": connected, "replica": replica, "heard": heard},
        )


async def _running(db, worker_id: str, lease_expires_at: datetime) -> uuid.UUID:
    job_id = uuid.uuid4()
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant, type, max_attempts, state, worker_id, started_at,"
                " lease_expires_at) VALUES (:id, 'acme', 'debug.noop', 3, 'running', :worker,"
                " CAST(:lease AS timestamptz) - interval '10 seconds', :lease)"
            ),
            {"id": job_id, "worker": worker_id, "lease": lease_expires_at},
        )
    return job_id


async def _reap(db, now: datetime, replica: str) -> set[str]:
    async with db.transaction() as s:
        return {str(t.job_id) for t in await leases.reap_expired_leases(s, now, replica=replica)}


async def _job(db, job_id: uuid.UUID):
    async with db.session() as s:
        rows = await s.execute(
            sa.text("SELECT state, attempt, lease_expires_at, error FROM jobs WHERE id = :id"),
            {"id": job_id},
        )
        return rows.one()


async def test_a_lease_is_reaped_by_the_workers_replica_or_once_the_worker_is_gone(db) -> None:
    now = datetime.now(UTC)
    expired = now - timedelta(seconds=0.5)
    await _worker(db, "on-r1", replica="r1", connected=True, heard=now - timedelta(seconds=3))
    await _worker(db, "gone", replica="r1", connected=False, heard=now - timedelta(seconds=3))
    on_r1 = await _running(db, "on-r1", expired)
    gone = await _running(db, "gone", expired)
    unknown = await _running(db, "never-registered", expired)
    live = await _running(db, "on-r1", now + timedelta(seconds=2))

    # Replica r2 leaves r1's connected worker alone; disconnected or unknown workers go.
    assert await _reap(db, now, "r2") == {str(gone), str(unknown)}
    assert (await _job(db, on_r1)).state == "running"
    # r1 itself judges its own worker by the lease; a live lease stays with anyone.
    assert await _reap(db, now, "r1") == {str(on_r1)}
    row = await _job(db, on_r1)
    assert (row.state, row.attempt, row.error["code"]) == ("queued", 2, "LEASE_EXPIRED")
    assert (await _job(db, live)).state == "running"


async def test_a_worker_whose_replica_died_gets_one_more_lease_then_is_reaped(db) -> None:
    now = datetime.now(UTC)
    heard = now - timedelta(seconds=7)  # r1 died 7 s ago: no heartbeat landed since
    await _worker(db, "orphan", replica="r1", connected=True, heard=heard)
    await _worker(db, "fresh", replica="r1", connected=True, heard=now)
    orphan = await _running(db, "orphan", heard + timedelta(seconds=LEASE_S))
    fresh = await _running(db, "fresh", now - timedelta(seconds=1))
    assert await _reap(db, now, "r2") == set()

    async with db.transaction() as s:
        marked = await workers_store.mark_stale_disconnected(
            s, now - timedelta(seconds=2 * LEASE_S), now, lease_s=LEASE_S
        )
    assert marked == (1, 1)  # only the unheard worker; its one running attempt
    row = await _job(db, orphan)
    assert row.state == "running"
    assert row.lease_expires_at == now + timedelta(seconds=LEASE_S)

    # Within the new lease it may still reconnect elsewhere; past it, it is reaped.
    assert await _reap(db, now + timedelta(seconds=LEASE_S - 0.1), "r2") == set()
    later = now + timedelta(seconds=LEASE_S + 0.1)
    assert await _reap(db, later, "r2") == {str(orphan)}
    assert (await _job(db, fresh)).state == "running"  # still heard: r1's to judge


async def test_marking_stale_never_shortens_a_lease(db) -> None:
    now = datetime.now(UTC)
    await _worker(db, "slow", replica="r1", connected=True, heard=now - timedelta(seconds=9))
    far = now + timedelta(seconds=60)
    job = await _running(db, "slow", far)
    async with db.transaction() as s:
        assert await workers_store.mark_stale_disconnected(
            s, now - timedelta(seconds=6), now, lease_s=LEASE_S
        ) == (1, 1)
    assert (await _job(db, job)).lease_expires_at == far
