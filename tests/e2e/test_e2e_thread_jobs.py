"""Thread job types (`Handler.isolation = "thread"`) in a real worker, end to end."""

from __future__ import annotations

import hashlib
import time

from e2e_support import _children, ticks, wait_connected, wait_until

from spool.v1 import job_pb2

CANCELED = job_pb2.JOB_STATE_CANCELED
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED

THREAD_TYPES = "e2e.thread_tick,e2e.thread_text,debug.noop"


async def test_a_thread_only_worker_runs_jobs_uploads_outputs_and_stops_stubborn_ones(
    cp, client, workers, tmp_path
):
    w = workers.start(cp, types=THREAD_TYPES)
    await wait_connected(cp, w)
    assert _children(w.proc.pid) == []  # every type runs on threads: no slot process

    job = await client.submit("e2e.thread_text", {"text": "hello from a thread"})
    done = await client.wait_state(job.id, SUCCEEDED, wait_s=15)
    digest = hashlib.sha256(b"hello from a thread").hexdigest()
    assert list(done.outputs) == [f"blob:sha256:{digest}"]

    # Ignoring a cancel: the thread cannot be killed, the attempt is Canceled
    # after the grace period anyway and the slot serves the next job...
    path = tmp_path / "ticks"
    job = await client.submit(
        "e2e.thread_tick", {"path": str(path), "duration": 4, "ignore_cancel": True}
    )
    await wait_until(lambda: ticks(path) >= 3, timeout=20)
    t0 = time.monotonic()
    await client.cancel(job.id)
    await client.wait_state(job.id, CANCELED, wait_s=15)
    assert time.monotonic() - t0 >= 1.0  # the forced stop, after cancel_grace_s (1.5 s)
    nxt = await client.submit("debug.noop", {})
    done = await client.wait_state(nxt.id, SUCCEEDED, wait_s=10)
    assert done.worker_id == w.worker_id
    # ... while the abandoned thread runs on until its handler returns (the
    # trade-off of isolation = "thread"); what it returns is dropped.
    at_cancel = ticks(path)
    await wait_until(lambda: ticks(path) > at_cancel, timeout=5)
    assert (await client.get(job.id)).state == CANCELED
    assert "abandoning the thread" in w.log()

    # No job left a work directory behind (only kept outputs may remain).
    work = tmp_path / f"{w.worker_id}.work"
    assert not work.exists() or [p.name for p in work.iterdir()] == []
