"""The Connect stream spoken directly by a scripted client: credits, fencing, reconnects."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import sqlalchemy as sa
from e2e_support import events, job_row, wait_until
from helpers import TENANT_A_KEY

from spool.v1 import job_pb2, worker_service_pb2

Req = worker_service_pb2.ConnectRequest
Ref = worker_service_pb2.AttemptRef
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED


async def test_never_more_assignments_than_credits(cp, client, raw):
    w = raw()
    w.hello("raw-1", slots=3)
    welcome = await w.read_kind("welcome")
    assert welcome.lease_duration.ToNanoseconds() == 2 * 10**9
    jobs = [await client.submit("debug.noop", {"i": i}) for i in range(6)]

    w.send(ready=Req.Ready(credits=2))
    first = [await w.read_kind("assign") for _ in range(2)]
    with pytest.raises(TimeoutError):
        await w.read(wait_s=0.5)  # a third would exceed the credits

    # Completing a job does not add credits; Ready does.
    a = first[0]
    w.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt)))
    await client.wait_state(a.job.id, SUCCEEDED)
    with pytest.raises(TimeoutError):
        await w.read(wait_s=0.3)
    w.send(ready=Req.Ready(credits=1))
    third = await w.read_kind("assign")
    with pytest.raises(TimeoutError):
        await w.read(wait_s=0.3)

    # Credits are capped at the declared slots (3), however many are announced:
    # 2 attempts still held + at most 3 new ones.
    w.send(ready=Req.Ready(credits=100))
    more = [await w.read_kind("assign") for _ in range(3)]
    with pytest.raises(TimeoutError):
        await w.read(wait_s=0.3)
    assigned = {x.job.id for x in [*first, third, *more]}
    assert assigned == {j.id for j in jobs}
    for x in more:
        assert x.attempt == 1 and x.lease_deadline.seconds > 0


async def test_stale_and_duplicate_messages_are_ignored(cp, client, raw):
    w = raw()
    w.hello("raw-2", slots=1)
    await w.read_kind("welcome")
    job = await client.submit("debug.noop", {})
    w.send(ready=Req.Ready(credits=1))
    a = await w.read_kind("assign")

    # Wrong attempt: refused, the job stays RUNNING.
    w.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt + 1)))
    w.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt)))
    w.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt)))
    done = await client.wait_state(job.id, SUCCEEDED)
    assert done.attempt == 1

    async def two_ignored() -> bool:
        return sum(e.kind == "ignored" for e in await events(cp, job.id)) == 2

    await wait_until(two_ignored)
    evs = await events(cp, job.id)
    assert [e.kind for e in evs] == ["state", "state", "ignored", "state", "ignored"]
    assert sum(1 for e in evs if e.kind == "state" and e.state == "succeeded") == 1


async def test_reconnect_keeps_the_leases_it_reports(cp, client, raw):
    w = raw()
    w.hello("raw-3", slots=2)
    await w.read_kind("welcome")
    kept = await client.submit("debug.noop", {"k": 1})
    lost = await client.submit("debug.noop", {"k": 2})
    w.send(ready=Req.Ready(credits=2))
    got = {(await w.read_kind("assign")).job.id for _ in range(2)}
    assert got == {kept.id, lost.id}
    await w.close()

    # Back within the lease, still running `kept` only.
    w2 = raw()
    w2.hello("raw-3", slots=2, running=[(kept.id, 1)])
    await w2.read_kind("welcome")

    async def lost_requeued() -> bool:
        row = await job_row(cp, lost.id)
        return row.state == "queued" and row.attempt == 2

    await wait_until(lost_requeued)
    assert (await job_row(cp, lost.id)).error["code"] == "WORKER_LOST"
    row = await job_row(cp, kept.id)
    assert (row.state, row.attempt, row.worker_id) == ("running", 1, "raw-3")
    w2.send(completed=Req.Completed(ref=Ref(job_id=kept.id, attempt=1)))
    done = await client.wait_state(kept.id, SUCCEEDED)
    assert done.attempt == 1


async def test_reported_attempt_that_is_not_yours_gets_cancel(cp, client, raw):
    job = await client.submit("debug.noop", {})
    w = raw()
    w.hello("raw-4", slots=1, running=[(job.id, 1)])
    await w.read_kind("welcome")
    cancel = await w.read_kind("cancel")
    assert (cancel.ref.job_id, cancel.ref.attempt) == (job.id, 1)
    assert cancel.grace_period.ToNanoseconds() > 0


async def test_heartbeat_keeps_lease_and_silence_loses_it(cp, client, raw):
    w = raw()
    w.hello("raw-5", slots=1)
    await w.read_kind("welcome")
    job = await client.submit("debug.noop", {})
    w.send(ready=Req.Ready(credits=1))
    a = await w.read_kind("assign")
    ref = Ref(job_id=a.job.id, attempt=a.attempt)
    # Heartbeats for 3 s (past the 2 s lease): still ours.
    for _ in range(6):
        w.send(heartbeat=Req.Heartbeat(running=[ref]))
        await asyncio.sleep(0.5)
    row = await job_row(cp, job.id)
    assert (row.state, row.attempt) == ("running", 1)

    # Silence: the lease runs out, the job is requeued (attempt 2) ...
    async def requeued() -> bool:
        return (await job_row(cp, job.id)).attempt == 2

    await wait_until(requeued, timeout=10)
    # ... and the next heartbeat naming attempt 1 is answered with a Cancel.
    w.send(heartbeat=Req.Heartbeat(running=[ref]))
    msg = await w.read(wait_s=5)
    while msg.WhichOneof("message") == "assign":  # attempt 2 may come back to us
        msg = await w.read(wait_s=5)
    assert msg.WhichOneof("message") == "cancel"
    assert (msg.cancel.ref.job_id, msg.cancel.ref.attempt) == (job.id, 1)


async def test_progress_failure_retry_and_release(cp, client, raw):
    w = raw()
    w.hello("raw-6", slots=1)
    await w.read_kind("welcome")
    job = await client.submit("debug.noop", {}, max_attempts=2)
    w.send(ready=Req.Ready(credits=1))
    a = await w.read_kind("assign")
    ref = Ref(job_id=a.job.id, attempt=1)
    w.send(progress=Req.ProgressUpdate(ref=ref, progress=job_pb2.Progress(fraction=0.25)))

    async def progress_seen() -> bool:
        return abs((await client.get(job.id)).progress.fraction - 0.25) < 1e-9

    await wait_until(progress_seen)
    # A retryable failure requeues it as attempt 2 after the backoff.
    w.send(
        failed=Req.Failed(
            ref=ref, error=job_pb2.JobError(code="FLAKY", message="try again", retryable=True)
        )
    )
    w.send(ready=Req.Ready(credits=1))
    b = await w.read_kind("assign")
    assert (b.job.id, b.attempt) == (job.id, 2)
    # Released on drain: back to QUEUED at once, the budget untouched.
    w.send(released=Req.Released(ref=Ref(job_id=job.id, attempt=2), reason="drain"))
    w.send(ready=Req.Ready(credits=1))
    c = await w.read_kind("assign")
    assert (c.job.id, c.attempt) == (job.id, 3)
    row = await job_row(cp, job.id)
    assert row.max_attempts == 3
    # Even a retryable failure fails the job on its last attempt.
    w.send(
        failed=Req.Failed(
            ref=Ref(job_id=job.id, attempt=3),
            error=job_pb2.JobError(code="BROKEN", message="no", retryable=True),
        )
    )
    done = await client.wait_state(job.id, job_pb2.JOB_STATE_FAILED)
    assert done.error.code == "BROKEN"


async def test_first_message_must_be_hello(cp, raw):
    w = raw()
    w.send(ready=Req.Ready(credits=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in err.value.details()


async def test_hello_without_job_types_is_rejected(cp, raw):
    w = raw()
    w.send(hello=Req.Hello(worker_id="raw-7"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.job_types" in err.value.details()


async def test_client_key_may_not_connect_as_worker(cp, raw):
    w = raw(TENANT_A_KEY)
    w.hello("raw-8")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_lost_cancel_hint_is_covered_by_the_sweep(cp, client, raw):
    w = raw()
    w.hello("raw-9", slots=1)
    await w.read_kind("welcome")
    job = await client.submit("debug.noop", {})
    w.send(ready=Req.Ready(credits=1))
    a = await w.read_kind("assign")
    # Request the cancel behind the control plane's back: no NOTIFY at all.
    async with cp.db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "UPDATE jobs SET cancel_requested = true, cancel_requested_at = now()"
                " WHERE id = CAST(:id AS uuid)"
            ),
            {"id": job.id},
        )
    cancel = await w.read_kind("cancel", wait_s=5)
    assert (cancel.ref.job_id, cancel.ref.attempt) == (a.job.id, a.attempt)
    w.send(canceled=Req.Canceled(ref=cancel.ref))
    await client.wait_state(job.id, job_pb2.JOB_STATE_CANCELED)
