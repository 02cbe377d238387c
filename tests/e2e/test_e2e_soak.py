"""Many jobs, many workers, two replicas: every job ends exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter

import pytest
import sqlalchemy as sa
from e2e_support import Client, control_plane, wait_connected, wait_until

from spool.v1 import job_pb2, job_service_pb2

SLOW = os.environ.get("SPOOL_SLOW") == "1"


async def _submit_all(client: Client, n: int, rng: random.Random) -> list[str]:
    specs = []
    for i in range(n):
        if i % 4 == 0:
            params = {"duration": rng.uniform(0.02, 0.2), "steps": 2}
            specs.append(job_pb2.JobSpec(type="debug.sleep", priority=rng.randint(-5, 5)))
            specs[-1].params.update(params)
        else:
            specs.append(job_pb2.JobSpec(type="debug.noop", priority=rng.randint(-5, 5)))
    ids: list[str] = []
    for chunk in range(0, n, 50):
        req = job_service_pb2.SubmitBatchRequest(jobs=specs[chunk : chunk + 50])
        resp = await client.stub.SubmitBatch(req, metadata=client.md)
        ids.extend(j.id for j in resp.jobs)
    return ids


async def _check_exactly_once(db, ids: list[str], *, chaos: bool) -> None:
    async with db.session() as s:
        states = dict(
            (
                await s.execute(
                    sa.text("SELECT id::text, state FROM jobs WHERE id::text = ANY(:ids)"),
                    {"ids": ids},
                )
            ).all()
        )
        terminal = Counter(
            r[0]
            for r in await s.execute(
                sa.text(
                    "SELECT job_id::text FROM job_events WHERE kind = 'state'"
                    " AND state IN ('succeeded', 'failed', 'canceled')"
                    " AND job_id::text = ANY(:ids)"
                ),
                {"ids": ids},
            )
        )
        gaps = (
            await s.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT job_id, count(*) AS n, max(seq) AS m"
                    " FROM job_events WHERE job_id::text = ANY(:ids) GROUP BY job_id) x"
                    " WHERE n <> m"
                ),
                {"ids": ids},
            )
        ).scalar()
        ignored = (
            await s.execute(
                sa.text(
                    "SELECT count(*) FROM job_events WHERE kind = 'ignored'"
                    " AND job_id::text = ANY(:ids)"
                ),
                {"ids": ids},
            )
        ).scalar()
    if not chaos:
        assert ignored == 0  # nothing was fenced off when no worker failed
    assert set(states) == set(ids)
    assert Counter(states.values()) == Counter({"succeeded": len(ids)})
    assert all(terminal[i] == 1 for i in ids), [i for i in ids if terminal[i] != 1][:5]
    assert gaps == 0


async def _fewer(count, than: int) -> bool:
    return await count() < than


async def _run(database_url, workers, n_jobs: int, n_workers: int, chaos: bool) -> None:
    rng = random.Random(7)
    async with control_plane(database_url) as a, control_plane(database_url) as b:
        planes = [a, b]
        ws = [workers.start(planes[i % 2], slots=2) for i in range(n_workers)]
        await wait_connected(a, *ws)
        clients = [Client(a.address), Client(b.address)]
        try:
            halves = await asyncio.gather(
                _submit_all(clients[0], n_jobs // 2, rng),
                _submit_all(clients[1], n_jobs - n_jobs // 2, rng),
            )
            ids = halves[0] + halves[1]

            async def left() -> int:
                async with a.db.session() as s:
                    return (
                        await s.execute(
                            sa.text(
                                "SELECT count(*) FROM jobs WHERE id::text = ANY(:ids)"
                                " AND state NOT IN ('succeeded', 'failed', 'canceled')"
                            ),
                            {"ids": ids},
                        )
                    ).scalar()

            if chaos:
                # A quarter through, kill a worker mid-job and start a replacement:
                # its attempts come back through the lease reaper.
                await wait_until(lambda: _fewer(left, n_jobs * 3 // 4), timeout=60)
                ws[0].signal(signal.SIGKILL)
                workers.start(a, slots=2)
            await wait_until(lambda: _fewer(left, 1), timeout=120 if chaos else 60)
            await _check_exactly_once(a.db, ids, chaos=chaos)
        finally:
            for c in clients:
                await c.close()


async def test_200_jobs_4_workers_2_replicas_each_ends_once(database_url, workers):
    await _run(database_url, workers, n_jobs=200, n_workers=4, chaos=False)


async def test_200_jobs_with_a_worker_killed_each_ends_once(database_url, workers):
    await _run(database_url, workers, n_jobs=200, n_workers=4, chaos=True)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="soak: SPOOL_SLOW=1")
async def test_2000_jobs_with_a_worker_killed_each_ends_once(database_url, workers):
    await _run(database_url, workers, n_jobs=2000, n_workers=4, chaos=True)
