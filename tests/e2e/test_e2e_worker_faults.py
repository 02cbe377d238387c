"""Faults on the worker stream: acknowledged outcomes, odd values, bounded history, identity.

Each test here pins one hole a hostile or unlucky run found: a result lost
because nothing acknowledged it, a NaN or NUL from a handler ending the stream,
a worker key impersonating another worker or running another tenant's jobs,
late messages growing a job's history without end, one poisoned job stalling
dispatch for everyone.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from e2e_support import Client, RawWorker, Ref, Req, events, job_row, wait_until
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from helpers import FLEET_KEY, TENANT_B_KEY, WORKER_B_KEY

from control.store.dispatch import MAX_IGNORED_EVENTS_PER_ATTEMPT
from spool.v1 import job_pb2, job_service_pb2

SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
QUEUED = job_pb2.JOB_STATE_QUEUED
FAILED = job_pb2.JOB_STATE_FAILED


async def _assigned(w: RawWorker, worker_id: str, credits: int = 1, **hello) -> list:
    """Hello, Welcome, Ready(credits), then the Assigns that come (as many as credits)."""
    w.hello(worker_id, **hello)
    await w.read_kind("welcome")
    w.send(ready=Req.Ready(credits=credits))
    return [await w.read_kind("assign") for _ in range(credits)]


async def _acked(w: RawWorker, job_id: str, attempt: int, wait_s: float = 10.0):
    return await wait_until(lambda: w.acks.get((job_id, attempt)), timeout=wait_s)


async def test_outcomes_are_acknowledged_and_stale_ones_refused(cp, client, raw):
    job = await client.submit("debug.noop")
    w = raw()
    (a,) = await _assigned(w, "ack-1")
    ref = Ref(job_id=a.job.id, attempt=a.attempt)
    w.send(completed=Req.Completed(ref=ref))
    ack = await _acked(w, job.id, a.attempt)
    assert ack.applied and not ack.reason
    assert (await client.get(job.id)).state == SUCCEEDED
    # The same outcome again (a resend whose Ack was lost) is refused, and says so.
    w.acks.clear()
    w.send(completed=Req.Completed(ref=ref))
    again = await _acked(w, job.id, a.attempt)
    assert not again.applied and "not running" in again.reason


async def test_a_result_sent_before_a_reconnect_is_applied_after_it(cp, client, raw):
    """The worker resends an unacknowledged outcome on its next stream: it lands there."""
    job = await client.submit("debug.noop")
    first = raw()
    (a,) = await _assigned(first, "resend-1")
    await first.close()  # the stream dies before any outcome reached control
    second = raw()
    second.hello("resend-1", running=[(a.job.id, a.attempt)])
    await second.read_kind("welcome")
    second.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt)))
    assert (await _acked(second, job.id, a.attempt)).applied
    done = await client.wait_state(job.id, SUCCEEDED)
    assert done.attempt == 1  # not re-run, not WORKER_LOST


async def test_values_a_handler_produces_never_end_the_stream(cp, client, raw):
    job = await client.submit("debug.noop")
    later = await client.submit("debug.noop")
    w = raw()
    (a,) = await _assigned(w, "odd-values")
    ref = Ref(job_id=a.job.id, attempt=a.attempt)
    odd_time = timestamp_pb2.Timestamp(seconds=10**15)
    w.send(
        progress=Req.ProgressUpdate(
            ref=ref,
            progress=job_pb2.Progress(
                fraction=math.nan,
                rate=math.inf,
                message="nul\x00inside",
                stage="\x00",
                update_time=odd_time,
                eta=duration_pb2.Duration(seconds=10**12),
            ),
        )
    )
    # A malformed job id, alone, is refused without touching the stream.
    bogus = Ref(job_id="not-a-uuid\x00", attempt=1)
    w.send(completed=Req.Completed(ref=bogus))
    result = struct_pb2.Struct()
    result.update({"loss": math.nan, "best": -math.inf, "note": "a\x00b", "ok": 1})
    w.send(completed=Req.Completed(ref=ref, result=result, outputs=["file:///x\x00y"]))
    assert (await _acked(w, job.id, a.attempt)).applied
    assert not (await _acked(w, "not-a-uuid\x00", 1)).applied
    done = await client.wait_state(job.id, SUCCEEDED)
    got = json.loads(json.dumps(dict(done.result)))
    assert got == {"loss": None, "best": None, "note": "ab", "ok": 1}
    assert list(done.outputs) == ["file:///xy"]
    row = await job_row(cp, job.id)
    assert row.progress["message"] == "nulinside" and row.progress["rate"] == 0
    # The same stream still serves: the next job comes on it.
    w.send(ready=Req.Ready(credits=1))
    nxt = await w.read_kind("assign")
    assert nxt.job.id == later.id


async def test_a_huge_retry_delay_is_capped_at_the_backoff_maximum(cp, client, raw):
    job = await client.submit("debug.noop", max_attempts=3)
    w = raw()
    (a,) = await _assigned(w, "delay-1")
    before = time.time()
    w.send(
        failed=Req.Failed(
            ref=Ref(job_id=a.job.id, attempt=a.attempt),
            error=job_pb2.JobError(code="X", message="again\x00", retryable=True),
            retry_delay=duration_pb2.Duration(seconds=10**12),
        )
    )
    assert (await _acked(w, job.id, a.attempt)).applied
    got = await client.wait_state(job.id, QUEUED)
    # E2E settings: retry_backoff_max_s = 1.0
    assert got.not_before.ToSeconds() <= before + 1.0 + 5.0
    assert got.error.message == "again"
    # It stays readable and removable: Get, List, Cancel answer cleanly.
    await client.cancel(job.id)


async def test_late_messages_leave_a_bounded_history_and_watch_ends_at_the_end(cp, client, raw):
    job = await client.submit("debug.noop")
    w = raw()
    (a,) = await _assigned(w, "late-1")
    ref = Ref(job_id=a.job.id, attempt=a.attempt)
    w.send(completed=Req.Completed(ref=ref))
    await client.wait_state(job.id, SUCCEEDED)
    for _ in range(20):
        w.send(completed=Req.Completed(ref=ref))
        w.send(released=Req.Released(ref=ref))
    await wait_until(lambda: len(w.acks) >= 1)
    await asyncio.sleep(0.5)  # let the refusals land

    async def ignored() -> list:
        return [e for e in await events(cp, job.id) if e.kind == "ignored"]

    await wait_until(ignored)
    assert len(await ignored()) == MAX_IGNORED_EVENTS_PER_ATTEMPT
    # A watcher from the start ends at the terminal event, not after the refusals.
    seen = []
    started = time.monotonic()
    req = job_service_pb2.WatchProgressRequest(job_id=job.id)

    async def watch() -> None:
        async for resp in client.stub.WatchProgress(req, metadata=client.md):
            seen.append(resp.event)

    await asyncio.wait_for(watch(), 10)
    assert time.monotonic() - started < 5
    assert seen[-1].kind == job_pb2.JOB_EVENT_KIND_STATE and seen[-1].state == SUCCEEDED
    # One resuming after the end ends at once too.
    req = job_service_pb2.WatchProgressRequest(job_id=job.id, after_seq=seen[-1].seq)
    rest = [r async for r in client.stub.WatchProgress(req, metadata=client.md)]
    assert rest and all(r.event.kind == job_pb2.JOB_EVENT_KIND_IGNORED for r in rest)


async def test_a_worker_id_is_bound_to_the_key_that_registered_it(cp, client, raw):
    job = await client.submit("debug.noop")
    owner = raw()
    (a,) = await _assigned(owner, "bound-1")
    thief = raw(WORKER_B_KEY)
    thief.hello("bound-1", running=[(a.job.id, a.attempt)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await thief.read(5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The forged result never lands; the owner's does.
    owner.send(completed=Req.Completed(ref=Ref(job_id=a.job.id, attempt=a.attempt)))
    assert (await _acked(owner, job.id, a.attempt)).applied
    assert (await client.wait_state(job.id, SUCCEEDED)).worker_id == "bound-1"


async def test_a_worker_key_runs_only_its_tenants_jobs_unless_it_is_a_fleet_key(cp, raw):
    a_job = await Client(cp.address).submit("debug.noop")
    b_client = Client(cp.address, TENANT_B_KEY)
    try:
        b_job = await b_client.submit("debug.noop")
        globex = raw(WORKER_B_KEY)
        (got,) = await _assigned(globex, "globex-1", credits=1)
        assert got.job.id == b_job.id
        globex.send(ready=Req.Ready(credits=1))
        with pytest.raises(TimeoutError):
            await globex.read(wait_s=1.0)  # acme's job is not for a globex key
        fleet = raw(FLEET_KEY)
        (got,) = await _assigned(fleet, "fleet-1", credits=1)
        assert got.job.id == a_job.id
        # ListWorkers: a tenant sees its own workers and the shared fleet, not others'.
        resp = await b_client.stub.ListWorkers(
            job_service_pb2.ListWorkersRequest(), metadata=b_client.md
        )
        assert {w.id for w in resp.workers} == {"globex-1", "fleet-1"}
    finally:
        await b_client.close()


async def test_workers_of_a_dead_replica_are_marked_disconnected(cp, raw):
    w = raw()
    w.hello("orphan-1")
    await w.read_kind("welcome")
    # A replica that died leaves its worker rows connected with stale heartbeats.
    async with cp.db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "UPDATE workers SET control_replica = 'gone', "
                "last_heartbeat_at = now() - interval '1 hour' WHERE id = 'orphan-1'"
            )
        )
    await w.close()

    async def gone() -> bool:
        async with cp.db.session() as s:
            row = (
                await s.execute(sa.text("SELECT connected FROM workers WHERE id = 'orphan-1'"))
            ).first()
        return row is not None and not row.connected

    await wait_until(gone, timeout=10)


async def _insert_poison(cp, concurrency_key: str | None = None) -> uuid.UUID:
    """A QUEUED job of tenant globex, first in line, holding a value no Submit accepts
    (finished_at in the year 20000, which the control plane cannot decode)."""
    poison = uuid.uuid4()
    async with cp.db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant, type, max_attempts, state, priority, finished_at,"
                " concurrency_key, concurrency_limit) "
                "VALUES (:id, 'globex', 'debug.noop', 1, 'queued', 10, "
                "'20000-01-01T00:00:00Z', :key, 1)"
            ),
            {"id": poison, "key": concurrency_key},
        )
    return poison


async def test_a_job_whose_stored_values_break_the_claim_is_quarantined(cp, client, raw):
    """If a claim statement errors on a stored value anyway, that job alone is set aside."""
    # On a keyed job: keyed candidates are started in a transaction, which rolls back.
    poison = await _insert_poison(cp, concurrency_key="k")
    good = await client.submit("debug.noop")
    w = raw(FLEET_KEY)
    (a,) = await _assigned(w, "fleet-q")
    assert a.job.id == good.id

    async def quarantined() -> bool:
        row = await job_row(cp, str(poison))
        return row.state == "failed" and row.error["code"] == "UNCLAIMABLE"

    await wait_until(quarantined, timeout=10)
    b = Client(cp.address, TENANT_B_KEY)
    try:
        assert (await b.get(str(poison))).state == FAILED  # readable again
    finally:
        await b.close()


async def test_a_job_the_claim_started_but_could_not_read_back_is_handed_back(cp, client, raw):
    """The claim statement commits what it starts; a row it cannot read back is not left
    RUNNING on a worker that never heard of it: it is handed back (its budget kept), and
    here the hand-back clears the bad value, so the job simply runs."""
    poison = await _insert_poison(cp)
    good = await client.submit("debug.noop")
    w = raw(FLEET_KEY)
    got = await _assigned(w, "fleet-h", credits=2)
    assert {a.job.id for a in got} == {good.id, str(poison)}
    handed_back = [e for e in await events(cp, str(poison)) if e.state == "queued" and e.seq > 1]
    assert [e.message for e in handed_back] == [
        "released by control: the claim could not read the job back"
    ]
    row = await job_row(cp, str(poison))
    assert (row.state, row.attempt, row.max_attempts) == ("running", 2, 2)
