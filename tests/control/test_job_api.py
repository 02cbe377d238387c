"""JobService happy paths, tenant isolation and auth, through a real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa
from control_support import count_rows, events_of, move, submit
from google.protobuf import struct_pb2
from helpers import TENANT_A_KEY, WORKER_KEY, open_channel

from spool.v1 import (
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

pb = job_service_pb2
S = job_pb2


def _params(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def test_submit_returns_a_queued_job_with_its_first_event(jobs, db) -> None:
    job = await submit(
        jobs,
        "video.remove_overlay",
        params=_params(threshold=0.5, mode="fast", nested={"a": [1, 2]}),
        inputs=["https://example.com/in.mp4"],  # blob: inputs must exist (tests/blobs)
        priority=7,
        labels={"team": "vision"},
        max_attempts=5,
    )
    assert uuid.UUID(job.id)
    assert job.tenant == "acme"
    assert job.state == S.JOB_STATE_QUEUED
    assert job.attempt == 1 and job.max_attempts == 5 and job.priority == 7
    assert job.params["mode"] == "fast" and job.params["nested"]["a"][1] == 2
    assert job.last_seq == 1
    events = await events_of(db, job.id)
    assert [(e["seq"], e["kind"], e["state"]) for e in events] == [(1, "state", "queued")]


async def test_max_attempts_zero_takes_the_default(jobs) -> None:
    job = await submit(jobs)
    assert job.max_attempts == 3


async def test_submit_is_idempotent_on_request_id(jobs, db) -> None:
    first = await jobs.Submit(pb.SubmitRequest(job=S.JobSpec(type="t", request_id="r-1")))
    again = await jobs.Submit(pb.SubmitRequest(job=S.JobSpec(type="t", request_id="r-1")))
    assert again.job.id == first.job.id
    assert (first.deduplicated, again.deduplicated) == (False, True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.Submit(pb.SubmitRequest(job=S.JobSpec(type="other", request_id="r-1")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await count_rows(db) == 1


async def test_twenty_concurrent_submits_of_one_request_id_make_one_row(jobs, db) -> None:
    request = pb.SubmitRequest(job=S.JobSpec(type="t", request_id="same", priority=3))
    responses = await asyncio.gather(*(jobs.Submit(request) for _ in range(20)))
    assert len({r.job.id for r in responses}) == 1
    assert sum(not r.deduplicated for r in responses) == 1
    assert await count_rows(db) == 1
    assert await count_rows(db, "job_events") == 1


async def test_submit_batch_is_ordered_and_all_or_nothing(jobs, db) -> None:
    specs = [S.JobSpec(type=f"t{i}", priority=i) for i in range(5)]
    response = await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=specs))
    assert [j.type for j in response.jobs] == [f"t{i}" for i in range(5)]
    assert await count_rows(db) == 5
    assert await count_rows(db, "job_events") == 5
    bad = [S.JobSpec(type="ok"), S.JobSpec(type="ok", priority=101)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[1].priority" in err.value.details()
    # A request_id clash fails the whole batch too.
    await jobs.Submit(pb.SubmitRequest(job=S.JobSpec(type="x", request_id="taken")))
    clash = [S.JobSpec(type="fresh"), S.JobSpec(type="y", request_id="taken")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=clash))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await count_rows(db) == 6


async def test_get_list_filters_and_order(jobs) -> None:
    a = await submit(jobs, "a", labels={"env": "prod", "team": "x"})
    b = await submit(jobs, "b", labels={"env": "dev"})
    c = await submit(jobs, "a", labels={"env": "prod"})
    got = await jobs.Get(pb.GetRequest(job_id=a.id))
    assert got.job.id == a.id and got.job.labels["team"] == "x"
    listed = await jobs.List(pb.ListRequest())
    assert [j.id for j in listed.jobs] == [c.id, b.id, a.id]
    assert listed.next_page_token == ""
    by_type = await jobs.List(pb.ListRequest(type="a"))
    assert [j.id for j in by_type.jobs] == [c.id, a.id]
    by_label = await jobs.List(pb.ListRequest(labels={"env": "prod", "team": "x"}))
    assert [j.id for j in by_label.jobs] == [a.id]
    await jobs.Cancel(pb.CancelRequest(job_id=b.id))
    canceled = await jobs.List(pb.ListRequest(states=[S.JOB_STATE_CANCELED]))
    assert [j.id for j in canceled.jobs] == [b.id]
    queued = await jobs.List(pb.ListRequest(states=[S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING]))
    assert {j.id for j in queued.jobs} == {a.id, c.id}


async def test_list_pages_with_tokens(jobs) -> None:
    await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="t")] * 7))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await jobs.List(pb.ListRequest(page_size=3, page_token=token))
        seen += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 7


async def test_list_pages_stay_stable_while_200_jobs_are_inserted(jobs) -> None:
    before = await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="old")] * 200))
    existing = {j.id for j in before.jobs}
    seen: list[str] = []
    token = ""
    inserted = 0
    while True:
        page = await jobs.List(pb.ListRequest(page_size=20, page_token=token))
        seen += [j.id for j in page.jobs]
        # Between pages, others keep submitting (20 one by one, then 20 in a batch).
        if inserted < 200:
            await asyncio.gather(*(submit(jobs, "new") for _ in range(10)))
            await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="new")] * 10))
            inserted += 20
        token = page.next_page_token
        if not token:
            break
    assert inserted == 200
    assert len(seen) == len(set(seen)), "a job appeared twice"
    assert existing <= set(seen), "a job that existed before paging was skipped"


async def test_cancel_queued_running_and_terminal(jobs, db) -> None:
    queued = await submit(jobs)
    canceled = (await jobs.Cancel(pb.CancelRequest(job_id=queued.id, reason="no"))).job
    assert canceled.state == S.JOB_STATE_CANCELED and canceled.finish_time.seconds > 0

    running = await submit(jobs)
    await move(db, running.id, "queued", "running", attempt=1, worker_id="w1")
    flagged = (await jobs.Cancel(pb.CancelRequest(job_id=running.id, reason="stop"))).job
    assert flagged.state == S.JOB_STATE_RUNNING and flagged.cancel_requested
    again = (await jobs.Cancel(pb.CancelRequest(job_id=running.id))).job
    assert again.last_seq == flagged.last_seq  # asking twice changes nothing
    kinds = [(e["kind"], e["message"]) for e in await events_of(db, running.id)]
    assert kinds[-1] == ("cancel_requested", "stop")

    done = await submit(jobs)
    await move(db, done.id, "queued", "running", attempt=1)
    await move(db, done.id, "running", "succeeded", attempt=1, result={"ok": True})
    unchanged = (await jobs.Cancel(pb.CancelRequest(job_id=done.id))).job
    assert unchanged.state == S.JOB_STATE_SUCCEEDED and not unchanged.cancel_requested
    assert unchanged.result["ok"] is True


async def test_cancel_racing_a_completion_ends_in_exactly_one_terminal_state(jobs, db) -> None:
    outcomes = {"canceled": 0, "succeeded": 0}
    for _ in range(100):
        job = await submit(jobs)

        async def complete(job_id: str = job.id) -> None:
            if await move(db, job_id, "queued", "running", attempt=1):
                await move(db, job_id, "running", "succeeded", attempt=1)

        await asyncio.gather(jobs.Cancel(pb.CancelRequest(job_id=job.id)), complete())
        final = (await jobs.Get(pb.GetRequest(job_id=job.id))).job
        events = await events_of(db, job.id)
        terminal = [e for e in events if e["kind"] == "state" and e["state"] != "queued"]
        terminal = [e for e in terminal if e["state"] != "running"]
        assert len(terminal) == 1, events
        assert [e["seq"] for e in events] == list(range(1, final.last_seq + 1))
        state = job_pb2.JobState.Name(final.state).removeprefix("JOB_STATE_").lower()
        assert state == terminal[0]["state"]
        outcomes[state] += 1
        # A terminal job never changes: a late completion loses.
        assert await move(db, job.id, "running", "succeeded", attempt=1) is None
    assert sum(outcomes.values()) == 100


async def test_retry_gives_a_fresh_budget_and_delete_needs_terminal(jobs, db) -> None:
    job = await submit(jobs, max_attempts=2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.Retry(pb.RetryRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.Delete(pb.DeleteRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await move(db, job.id, "queued", "running", attempt=1)
    await move(db, job.id, "running", "failed", attempt=1, error={"code": "X", "message": "m"})
    retried = (await jobs.Retry(pb.RetryRequest(job_id=job.id))).job
    assert retried.state == S.JOB_STATE_QUEUED and retried.attempt == 2
    assert retried.max_attempts == 3  # attempts 2 and 3: a fresh budget of 2
    assert not retried.HasField("error")
    # Fail again at attempt 3 (budget spent); the next budget is again 2 attempts.
    await move(db, job.id, "queued", "running", attempt=2)
    await move(db, job.id, "running", "queued", attempt=2)
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text("UPDATE jobs SET attempt = 3 WHERE id = :id"), {"id": uuid.UUID(job.id)}
        )
    await move(db, job.id, "queued", "running", attempt=3)
    await move(db, job.id, "running", "failed", attempt=3)
    again = (await jobs.Retry(pb.RetryRequest(job_id=job.id))).job
    assert (again.attempt, again.max_attempts) == (4, 5)

    await jobs.Cancel(pb.CancelRequest(job_id=job.id))
    await jobs.Delete(pb.DeleteRequest(job_id=job.id))
    assert await count_rows(db) == 0
    assert await count_rows(db, "job_events") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.Get(pb.GetRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_stats_and_list_workers(jobs, db) -> None:
    await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="a")] * 3))
    b = await submit(jobs, "b")
    await move(db, b.id, "queued", "running", attempt=1, worker_id="w-1")
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO workers (id, name, connected, job_types, device) VALUES "
                "('w-1', 'gpu-box', true, '[\"a\", \"b\"]', '{\"kind\": \"cpu\"}'), "
                "('w-2', 'old', false, '[]', '{}')"
            )
        )
    stats = await jobs.GetStats(pb.GetStatsRequest())
    assert (stats.totals.queued, stats.totals.running) == (3, 1)
    assert stats.by_type["a"].queued == 3 and stats.by_type["b"].running == 1
    assert stats.queue_depth == 3
    assert stats.oldest_queued_age.ToNanoseconds() >= 0
    assert stats.connected_workers == 1
    workers = (await jobs.ListWorkers(pb.ListWorkersRequest())).workers
    assert [(w.id, w.device.kind, list(w.running_job_ids)) for w in workers] == [
        ("w-1", "cpu", [b.id])
    ]
    everyone = await jobs.ListWorkers(pb.ListWorkersRequest(include_disconnected=True))
    assert [w.id for w in everyone.workers] == ["w-1", "w-2"]


async def test_another_tenant_sees_nothing(jobs, jobs_b, db) -> None:
    job = await submit(jobs)
    done = await submit(jobs)
    await jobs.Cancel(pb.CancelRequest(job_id=done.id))
    calls = [
        jobs_b.Get(pb.GetRequest(job_id=job.id)),
        jobs_b.Cancel(pb.CancelRequest(job_id=job.id)),
        jobs_b.Delete(pb.DeleteRequest(job_id=done.id)),
        jobs_b.Retry(pb.RetryRequest(job_id=done.id)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in jobs_b.WatchProgress(pb.WatchProgressRequest(job_id=job.id)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len((await jobs_b.List(pb.ListRequest())).jobs) == 0
    assert (await jobs_b.GetStats(pb.GetStatsRequest())).totals.queued == 0
    # Nothing changed for the owner.
    assert (await jobs.Get(pb.GetRequest(job_id=job.id))).job.state == S.JOB_STATE_QUEUED
    assert await count_rows(db) == 2


async def test_calls_without_a_valid_key_are_refused(control) -> None:
    for key in (None, "not-a-key"):
        async with open_channel(control.address, key) as ch:
            stub = job_service_pb2_grpc.JobServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.List(pb.ListRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_worker_keys_cannot_use_jobs_and_client_keys_cannot_connect(control) -> None:
    async with open_channel(control.address, WORKER_KEY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await job_service_pb2_grpc.JobServiceStub(ch).List(pb.ListRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with open_channel(control.address, TENANT_A_KEY) as ch:
        call = worker_service_pb2_grpc.WorkerServiceStub(ch).Connect(_no_requests())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def _no_requests() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
    return
    yield


async def test_request_id_is_echoed(jobs) -> None:
    call = jobs.List(pb.ListRequest(), metadata=(("x-request-id", "req-123"),))
    await call
    assert ("x-request-id", "req-123") in tuple(await call.trailing_metadata())
    call = jobs.List(pb.ListRequest())
    await call
    generated = dict(tuple(await call.trailing_metadata()))["x-request-id"]
    assert len(generated) == 32


async def test_errors_carry_the_request_id_too(control) -> None:
    async with open_channel(control.address, "bad-key") as ch:
        call = job_service_pb2_grpc.JobServiceStub(ch).List(
            pb.ListRequest(), metadata=(("x-request-id", "req-err"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert ("x-request-id", "req-err") in tuple(err.value.trailing_metadata())
