"""Group commit (control.services.group_commit): unit tests without I/O, then single
Submits through a real server that share INSERTs but keep their own answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from control_support import count_rows

from control.services.group_commit import GroupCommit
from spool.v1 import job_pb2, job_service_pb2

pb = job_service_pb2
S = job_pb2


class Recorder:
    """A flush that records its batches and waits for `release` before it returns."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def flush(self, key: str, items: Sequence[int]) -> list[object]:
        self.batches.append((key, list(items)))
        self.started.set()
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_a_lone_call_is_written_at_once_and_later_calls_share_the_next_write() -> None:
    rec = Recorder()
    gc: GroupCommit[str, int, int] = GroupCommit(rec.flush, max_batch=100, name="t")
    first = asyncio.create_task(gc.submit("a", 0))
    await rec.started.wait()
    assert rec.batches == [("a", [0])]  # not held back waiting for company
    later = [asyncio.create_task(gc.submit("a", i)) for i in (2, 4, 6)]
    await asyncio.sleep(0.01)
    assert len(rec.batches) == 1  # queued behind the write in flight
    rec.release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [20, 40, 60]
    assert rec.batches == [("a", [0]), ("a", [2, 4, 6])]


async def test_each_call_gets_its_own_outcome_and_batches_stay_per_key_and_bounded() -> None:
    rec = Recorder()
    rec.release.set()
    gc: GroupCommit[str, int, int] = GroupCommit(rec.flush, max_batch=2, name="t")
    calls = [gc.submit(key, i) for key, i in [("a", 0), ("a", 1), ("b", 2), ("a", 4), ("a", 6)]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 0 and results[2] == 20 and results[3] == 40 and results[4] == 60
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert all(len(items) <= 2 for _, items in rec.batches)
    assert all(
        {i for i in items} <= ({0, 1, 4, 6} if k == "a" else {2}) for k, items in rec.batches
    )
    assert sorted(i for _, items in rec.batches for i in items) == [0, 1, 2, 4, 6]


async def test_a_failed_write_fails_its_batch_only() -> None:
    calls = 0

    async def flush(key: str, items: Sequence[int]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database went away")
        return list(items)

    gc: GroupCommit[str, int, int] = GroupCommit(flush, max_batch=10, name="t")
    with pytest.raises(ConnectionError):
        await gc.submit("a", 1)
    assert await gc.submit("a", 2) == 2


async def test_a_caller_that_stops_waiting_does_not_cut_the_write_short() -> None:
    rec = Recorder()
    gc: GroupCommit[str, int, int] = GroupCommit(rec.flush, max_batch=10, name="t")
    caller = asyncio.create_task(gc.submit("a", 8))
    await rec.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    rec.release.set()
    await gc.close()
    assert rec.batches == [("a", [8])]
    assert await gc.submit("a", 10) == 100  # the writer still serves


async def test_concurrent_submits_share_inserts_and_keep_their_own_answers(jobs, db) -> None:
    """60 Submits at once: plain ones, repeats of one request_id, and a request_id
    reused for a different job (only that one fails)."""
    plain = [pb.SubmitRequest(job=S.JobSpec(type="t", priority=i % 5)) for i in range(40)]
    repeat = pb.SubmitRequest(job=S.JobSpec(type="t", request_id="same", priority=1))
    clash = pb.SubmitRequest(job=S.JobSpec(type="other", request_id="same", priority=1))
    requests = plain + [repeat] * 19 + [clash]
    answers = await asyncio.gather(*(jobs.Submit(r) for r in requests), return_exceptions=True)

    plain_answers = answers[:40]
    assert all(not a.deduplicated and a.job.state == S.JOB_STATE_QUEUED for a in plain_answers)
    assert [a.job.priority for a in plain_answers] == [i % 5 for i in range(40)]
    assert len({a.job.id for a in plain_answers}) == 40
    # Of the 20 with request_id "same", whichever landed first made the job; the
    # same spec is answered with that job, the other spec is ALREADY_EXISTS.
    same = list(zip(requests[40:], answers[40:], strict=True))
    made = [a for _, a in same if not isinstance(a, BaseException) and not a.deduplicated]
    assert len(made) == 1
    winner = made[0].job
    for request, answer in same:
        if request.job.type == winner.type:
            assert answer.job.id == winner.id
        else:
            assert isinstance(answer, grpc.aio.AioRpcError)
            assert answer.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await count_rows(db) == 41
    assert await count_rows(db, "job_events") == 41
