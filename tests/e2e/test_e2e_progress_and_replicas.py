"""Progress is real while a job runs, on any replica; cancel reaches across replicas."""

from __future__ import annotations

import asyncio

from e2e_support import Client, control_plane, job_row, ticks, wait_connected, wait_until

from spool.v1 import job_pb2, job_service_pb2

RUNNING = job_pb2.JOB_STATE_RUNNING
CANCELED = job_pb2.JOB_STATE_CANCELED
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
PROGRESS = job_pb2.JOB_EVENT_KIND_PROGRESS
STATE = job_pb2.JOB_EVENT_KIND_STATE


async def _watch(client: Client, job_id: str, into: list) -> None:
    req = job_service_pb2.WatchProgressRequest(job_id=job_id)
    async for resp in client.stub.WatchProgress(req, metadata=client.md):
        into.append(resp.event)


async def test_progress_visible_through_get_and_watch_while_running(cp, client, workers):
    """The "stuck at 0%" regression: progress must show while the job runs."""
    w = workers.start(cp)
    await wait_connected(cp, w)
    seen: list = []
    job = await client.submit("debug.sleep", {"duration": 2.0, "steps": 20})
    watcher = asyncio.create_task(_watch(client, job.id, seen))
    try:

        async def midway() -> bool:
            j = await client.get(job.id)
            return j.state == RUNNING and 0.2 <= j.progress.fraction < 1.0

        await wait_until(midway, timeout=15)
        live = [e for e in seen if e.kind == PROGRESS]
        assert live, "WatchProgress delivered no progress while the job ran"
        assert all(0.0 < e.progress.fraction < 1.0 for e in live)
        await client.wait_state(job.id, SUCCEEDED)
        await asyncio.wait_for(watcher, 10)  # the watch ends after the terminal event
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    fractions = [e.progress.fraction for e in seen if e.kind == PROGRESS]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0  # the final value is always written
    assert seen[-1].kind == STATE and seen[-1].state == SUCCEEDED
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))


async def test_two_replicas_cancel_and_watch_across(database_url, workers, tmp_path):
    async with control_plane(database_url) as a, control_plane(database_url) as b:
        w = workers.start(a)  # the worker talks to replica A only
        await wait_connected(a, w)
        on_b = Client(b.address)
        seen: list = []
        try:
            path = tmp_path / "ticks"
            job = await on_b.submit("e2e.tick", {"path": str(path), "duration": 30})
            watcher = asyncio.create_task(_watch(on_b, job.id, seen))

            # The watcher on B sees progress the worker reports to A.
            await wait_until(lambda: any(e.kind == PROGRESS for e in seen), timeout=15)
            assert (await job_row(b, job.id)).worker_id == w.worker_id

            # Cancel through B reaches the handler on the worker connected to A.
            await on_b.cancel(job.id)
            await on_b.wait_state(job.id, CANCELED, wait_s=10)
            await asyncio.wait_for(watcher, 10)
            last = [e for e in seen if e.kind == STATE][-1]
            assert last.state == CANCELED and last.message != "cancel grace period over"
            n = ticks(path)
            await asyncio.sleep(0.3)
            assert ticks(path) == n  # the handler stopped

            # And the worker goes on serving, jobs submitted on either replica.
            more = [await on_b.submit("debug.noop", {}) for _ in range(3)]
            for j in more:
                await on_b.wait_state(j.id, SUCCEEDED, wait_s=15)
        finally:
            await on_b.close()
