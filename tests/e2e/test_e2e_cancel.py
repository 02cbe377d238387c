"""Cancel reaching running code: cooperative, forced after the grace period, timeouts."""

from __future__ import annotations

import time

from e2e_support import (
    Client,
    control_plane,
    events,
    job_row,
    ticks,
    wait_connected,
    wait_until,
)

from spool.v1 import job_pb2

RUNNING = job_pb2.JOB_STATE_RUNNING
CANCELED = job_pb2.JOB_STATE_CANCELED
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
FAILED = job_pb2.JOB_STATE_FAILED


async def _ticking(path) -> None:
    """Wait until the e2e.tick handler writing `path` has ticked a few times."""
    await wait_until(lambda: ticks(path) >= 3, timeout=20)


async def _stopped_ticking(path) -> int:
    """Wait until `path` stops growing (the handler is stopped); returns the count."""
    last = [-1, time.monotonic()]

    def still() -> bool:
        n = ticks(path)
        if n != last[0]:
            last[0], last[1] = n, time.monotonic()
            return False
        return time.monotonic() - last[1] >= 0.3

    await wait_until(still, timeout=20)
    return last[0]


async def test_cancel_running_job_stops_the_handler(database_url, workers, tmp_path):
    # A long grace period: the CANCELED state must come from the worker's confirmation.
    async with control_plane(database_url, cancel_grace_s=10) as cp:
        client = Client(cp.address)
        try:
            await _cancel_cooperative(cp, client, workers, tmp_path)
        finally:
            await client.close()


async def _cancel_cooperative(cp, client, workers, tmp_path) -> None:
    w = workers.start(cp)
    await wait_connected(cp, w)
    path = tmp_path / "ticks"
    job = await client.submit("e2e.tick", {"path": str(path), "duration": 30})
    await _ticking(path)

    t0 = time.monotonic()
    await client.cancel(job.id)
    done = await client.wait_state(job.id, CANCELED, wait_s=10)
    took = time.monotonic() - t0
    stopped_at = await _stopped_ticking(path)

    # The worker confirmed, well before the grace period would have forced it.
    assert took < 5.0, took
    evs = await events(cp, job.id)
    final = evs[-1]
    assert final.kind == "state" and final.state == "canceled"
    assert final.message != "cancel grace period over"
    assert done.attempt == 1
    # Nothing more is written after the handler stopped.
    assert ticks(path) == stopped_at

    # The worker serves the next job.
    nxt = await client.submit("debug.noop", {})
    await client.wait_state(nxt.id, SUCCEEDED, wait_s=10)


async def test_handler_ignoring_cancel_is_stopped_after_grace(cp, client, workers, tmp_path):
    w = workers.start(cp)
    await wait_connected(cp, w)
    path = tmp_path / "ticks"
    job = await client.submit(
        "e2e.tick", {"path": str(path), "duration": 60, "ignore_cancel": True}
    )
    await _ticking(path)

    await client.cancel(job.id)
    await client.wait_state(job.id, CANCELED, wait_s=15)
    stopped_at = await _stopped_ticking(path)
    assert ticks(path) == stopped_at

    # The worker (one slot) is free again and serves the next job.
    nxt = await client.submit("debug.noop", {})
    done = await client.wait_state(nxt.id, SUCCEEDED, wait_s=20)
    assert done.worker_id == w.worker_id


async def test_timeout_fails_the_attempt_and_stops_the_handler(cp, client, workers, tmp_path):
    w = workers.start(cp)
    await wait_connected(cp, w)
    path = tmp_path / "ticks"
    job = await client.submit(
        "e2e.tick", {"path": str(path), "duration": 60}, timeout=0.5, max_attempts=1
    )
    done = await client.wait_state(job.id, FAILED, wait_s=15)
    assert done.error.code == "DEADLINE_EXCEEDED"
    assert done.attempt == 1
    await _stopped_ticking(path)
    row = await job_row(cp, job.id)
    assert row.finished_at - row.started_at >= __import__("datetime").timedelta(seconds=0.5)

    nxt = await client.submit("debug.noop", {})
    await client.wait_state(nxt.id, SUCCEEDED, wait_s=20)


async def test_timeout_with_attempts_left_retries(cp, client, workers):
    w = workers.start(cp)
    await wait_connected(cp, w)
    job = await client.submit(
        "debug.sleep", {"duration": 30, "steps": 300}, timeout=0.3, max_attempts=2
    )
    done = await client.wait_state(job.id, FAILED, wait_s=20)
    assert done.attempt == 2 and done.error.code == "DEADLINE_EXCEEDED"
    states = [(e.state, e.attempt) for e in await events(cp, job.id) if e.kind == "state"]
    assert states[:4] == [("queued", 1), ("running", 1), ("queued", 2), ("running", 2)]
    assert states[-1] == ("failed", 2)
