"""Workers dying and coming back: nothing lost, nothing finished twice."""

from __future__ import annotations

import asyncio
import signal
import time

from e2e_support import events, job_row, wait_connected, wait_until

from spool.v1 import job_pb2

SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
RUNNING = job_pb2.JOB_STATE_RUNNING


def _terminal_events(evs):
    return [e for e in evs if e.kind == "state" and e.state in ("succeeded", "failed", "canceled")]


async def test_sigkill_mid_job_finishes_on_another_worker_at_attempt_2(cp, client, workers):
    both = [workers.start(cp), workers.start(cp)]
    await wait_connected(cp, *both)
    job = await client.submit("debug.sleep", {"duration": 1.0, "steps": 10})
    await client.wait_state(job.id, RUNNING)
    holder = (await job_row(cp, job.id)).worker_id
    w1, w2 = both if both[0].worker_id == holder else both[::-1]

    w1.signal(signal.SIGKILL)

    done = await client.wait_state(job.id, SUCCEEDED, wait_s=20)
    assert done.attempt == 2
    assert done.worker_id == w2.worker_id
    evs = await events(cp, job.id)
    requeued = [e for e in evs if e.kind == "state" and e.state == "queued" and e.error]
    assert [e.error["code"] for e in requeued] == ["LEASE_EXPIRED"]
    assert len(_terminal_events(evs)) == 1
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))


async def test_sigstopped_worker_late_result_is_refused(cp, client, workers):
    w1 = workers.start(cp)
    await wait_connected(cp, w1)
    job = await client.submit("debug.sleep", {"duration": 2.0, "steps": 20})
    await client.wait_state(job.id, RUNNING)

    # Frozen past its lease: the job is re-run elsewhere as attempt 2.
    w1.signal(signal.SIGSTOP)
    w2 = workers.start(cp)

    async def rerun() -> bool:
        row = await job_row(cp, job.id)
        return row.state == "running" and row.attempt == 2

    await wait_until(rerun, timeout=20)
    assert (await job_row(cp, job.id)).worker_id == w2.worker_id

    # The zombie wakes up; whatever it says about attempt 1 is refused.
    w1.signal(signal.SIGCONT)

    async def zombie_refused() -> bool:
        return any(
            e.kind == "ignored" and e.attempt == 1 and e.worker_id == w1.worker_id
            for e in await events(cp, job.id)
        )

    await wait_until(zombie_refused, timeout=20)
    done = await client.wait_state(job.id, SUCCEEDED, wait_s=20)
    assert done.attempt == 2
    assert done.worker_id == w2.worker_id
    evs = await events(cp, job.id)
    terminal = _terminal_events(evs)
    assert len(terminal) == 1 and terminal[0].attempt == 2
    assert terminal[0].worker_id == w2.worker_id


async def test_restarted_worker_gets_its_lost_attempt_requeued_at_once(cp, client, workers):
    w1 = workers.start(cp, worker_id="w-restart")
    await wait_connected(cp, w1)
    job = await client.submit("debug.sleep", {"duration": 30, "steps": 30}, max_attempts=3)
    await client.wait_state(job.id, RUNNING)
    w1.signal(signal.SIGKILL)
    await asyncio.to_thread(w1.proc.wait)

    # Same worker id, back at once: it does not report the attempt, so the attempt
    # is requeued right away (WORKER_LOST) instead of after the lease, and re-run.
    t0 = time.monotonic()
    workers.start(cp, worker_id="w-restart")

    async def rerun() -> bool:
        row = await job_row(cp, job.id)
        return row.state == "running" and row.attempt == 2

    await wait_until(rerun, timeout=20)
    codes = [e.error["code"] for e in await events(cp, job.id) if e.kind == "state" and e.error]
    assert codes == ["WORKER_LOST"], codes
    assert time.monotonic() - t0 < 15


async def test_draining_worker_hands_its_job_back(cp, client, workers):
    w1 = workers.start(cp, drain_grace_s=0.3)
    await wait_connected(cp, w1)
    job = await client.submit("debug.sleep", {"duration": 3, "steps": 30}, max_attempts=1)
    await client.wait_state(job.id, RUNNING)
    w2 = workers.start(cp)
    await wait_connected(cp, w2)

    w1.signal(signal.SIGTERM)  # drain: the job cannot finish within 0.3 s

    done = await client.wait_state(job.id, SUCCEEDED, wait_s=30)
    assert done.worker_id == w2.worker_id
    # Handed back without spending the one attempt it had.
    assert (done.attempt, done.max_attempts) == (2, 2)
    released = [e for e in await events(cp, job.id) if e.message.startswith("released by worker")]
    assert len(released) == 1 and released[0].attempt == 2
