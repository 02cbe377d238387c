"""Batch messages on the worker stream, and prefetch: many jobs a message, never too many."""

from __future__ import annotations

import asyncio

from e2e_support import Ref, Req, job_row
from helpers import wait_until

from spool.v1 import job_pb2


async def _welcome(w, worker_id: str, **hello):
    w.hello(worker_id, **hello)
    return await w.read_kind("welcome")


def _completed(assign) -> Req:
    return Req(completed=Req.Completed(ref=Ref(job_id=assign.job.id, attempt=assign.attempt)))


async def test_assigns_and_outcomes_travel_in_batches(cp, client, raw):
    jobs = [await client.submit("debug.noop") for _ in range(5)]
    w = raw()
    welcome = await _welcome(w, "batch-1", slots=5, batches=True)
    assert welcome.accepts_batches
    w.send(ready=Req.Ready(credits=5))
    assigns = [await w.read_kind("assign") for _ in range(5)]
    assert sorted(a.job.id for a in assigns) == sorted(j.id for j in jobs)
    assert w.batches == [5]  # one claim, one message
    # The lean Job of an Assign: what a handler needs.
    assert assigns[0].job.type == "debug.noop" and assigns[0].job.tenant
    assert assigns[0].job.state == job_pb2.JOB_STATE_RUNNING
    # Five outcomes in one message: one statement, one Ack.
    w.send(batch=Req.Batch(messages=[_completed(a) for a in assigns]))
    for a in assigns:
        await wait_until(lambda a=a: w.acks.get((a.job.id, a.attempt)), timeout=10)
    assert all(w.acks[(a.job.id, a.attempt)].applied for a in assigns)
    for j in jobs:
        assert (await job_row(cp, j.id)).state == "succeeded"


async def test_a_worker_that_does_not_ask_for_batches_gets_single_messages(cp, client, raw):
    for _ in range(3):
        await client.submit("debug.noop")
    w = raw()
    await _welcome(w, "single-1", slots=3)
    w.send(ready=Req.Ready(credits=3))
    assigns = [await w.read_kind("assign") for _ in range(3)]
    assert len({a.job.id for a in assigns}) == 3
    assert w.batches == []


async def test_a_batch_inside_a_batch_is_ignored_and_the_stream_goes_on(cp, client, raw):
    job = await client.submit("debug.noop")
    w = raw()
    await _welcome(w, "nested-1", slots=1, batches=True)
    w.send(ready=Req.Ready(credits=1))
    a = await w.read_kind("assign")
    inner = Req(batch=Req.Batch(messages=[_completed(a)]))
    w.send(batch=Req.Batch(messages=[inner]))
    await asyncio.sleep(0.5)
    assert (await job_row(cp, job.id)).state == "running"
    w.send(completed=_completed(a).completed)
    await wait_until(lambda: w.acks.get((a.job.id, a.attempt)), timeout=10)
    assert (await job_row(cp, job.id)).state == "succeeded"


async def test_credits_never_exceed_slots_plus_prefetch(cp, client, raw):
    for _ in range(6):
        await client.submit("debug.noop")
    w = raw()
    await _welcome(w, "prefetch-raw", slots=1, prefetch=2)
    w.send(ready=Req.Ready(credits=6))
    got = [await w.read_kind("assign") for _ in range(3)]
    assert len({a.job.id for a in got}) == 3
    try:
        extra = await w.read(wait_s=1.0)
    except TimeoutError:
        extra = None
    assert extra is None, extra


async def test_a_prefetched_job_waits_for_a_slot_and_a_cancel_ends_it_unrun(cp, client, workers):
    """One slot, prefetch 2: three jobs held at once; cancelling the last ends it at once."""
    workers.start(cp, slots=1, prefetch=2, types="debug.sleep")
    jobs = [await client.submit("debug.sleep", {"duration": 1.5}) for _ in range(3)]
    for j in jobs:
        await client.wait_state(j.id, job_pb2.JOB_STATE_RUNNING)
    canceled = await client.cancel(jobs[2].id)
    assert canceled.cancel_requested or canceled.state == job_pb2.JOB_STATE_CANCELED
    # Well before the slot could have reached it (the first two take 3 s between them).
    done = await client.wait_state(jobs[2].id, job_pb2.JOB_STATE_CANCELED, wait_s=1.2)
    assert done.state == job_pb2.JOB_STATE_CANCELED
    for j in jobs[:2]:
        await client.wait_state(j.id, job_pb2.JOB_STATE_SUCCEEDED, wait_s=15)
