"""WatchProgress: replay, live events, reconnect with the last seq, many watchers."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import sqlalchemy as sa
from control_support import move, submit
from helpers import wait_until

from control.config import Settings
from control.notify import EVENTS_CHANNEL, Notifier
from control.services.dispatch import utcnow
from control.services.jobs import JobsService
from control.store import dispatch as dispatch_store
from control.store import events as events_store
from spool.v1 import job_pb2, job_service_pb2

pb = job_service_pb2
S = job_pb2


class Watcher:
    """Collects a WatchProgress stream's events in a task."""

    def __init__(self, stub, job_id: str, after_seq: int = 0) -> None:
        self.call = stub.WatchProgress(pb.WatchProgressRequest(job_id=job_id, after_seq=after_seq))
        self.events: list[job_pb2.JobEvent] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for response in self.call:
            self.events.append(response.event)

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]

    async def wait_for_seq(self, seq: int) -> None:
        await wait_until(lambda: self.seqs and self.seqs[-1] >= seq, timeout=10)

    async def finished(self) -> None:
        await asyncio.wait_for(self.task, 10)

    async def stop(self) -> None:
        self.call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_replay_then_live_then_end_after_terminal(jobs, db) -> None:
    job = await submit(jobs)
    await move(db, job.id, "queued", "running", attempt=1, worker_id="w")
    watcher = Watcher(jobs, job.id)
    await watcher.wait_for_seq(2)  # replayed: queued, running
    await jobs.Cancel(pb.CancelRequest(job_id=job.id, reason="enough"))
    await watcher.wait_for_seq(3)  # live
    await move(db, job.id, "running", "canceled", attempt=1)
    await watcher.finished()  # ends by itself after the terminal event
    assert watcher.seqs == [1, 2, 3, 4]
    kinds = [(e.kind, e.state) for e in watcher.events]
    assert kinds == [
        (S.JOB_EVENT_KIND_STATE, S.JOB_STATE_QUEUED),
        (S.JOB_EVENT_KIND_STATE, S.JOB_STATE_RUNNING),
        (S.JOB_EVENT_KIND_CANCEL_REQUESTED, S.JOB_STATE_RUNNING),
        (S.JOB_EVENT_KIND_STATE, S.JOB_STATE_CANCELED),
    ]
    assert watcher.events[2].message == "enough"
    assert watcher.events[1].worker_id == "w"


async def test_reconnect_with_last_seq_misses_nothing_and_repeats_nothing(jobs, db) -> None:
    job = await submit(jobs)
    first = Watcher(jobs, job.id)
    await first.wait_for_seq(1)
    await move(db, job.id, "queued", "running", attempt=1)
    await first.wait_for_seq(2)
    await first.stop()  # the client drops
    # Changes while nobody watches.
    await move(db, job.id, "running", "queued", attempt=1)
    await move(db, job.id, "queued", "running", attempt=1)
    second = Watcher(jobs, job.id, after_seq=first.seqs[-1])
    await second.wait_for_seq(4)
    await move(db, job.id, "running", "succeeded", attempt=1)
    await second.finished()
    assert first.seqs + second.seqs == [1, 2, 3, 4, 5]


async def test_many_watchers_see_the_same_history(jobs, db) -> None:
    job = await submit(jobs)
    watchers = [Watcher(jobs, job.id) for _ in range(10)]
    for w in watchers:
        await w.wait_for_seq(1)
    await move(db, job.id, "queued", "running", attempt=1)
    await move(db, job.id, "running", "failed", attempt=1, error={"code": "E", "message": "boom"})
    for w in watchers:
        await w.finished()
        assert w.seqs == [1, 2, 3]
        assert w.events[-1].error.message == "boom"


async def test_watching_a_finished_job_replays_and_ends(jobs, db) -> None:
    job = await submit(jobs)
    await jobs.Cancel(pb.CancelRequest(job_id=job.id))
    replay = Watcher(jobs, job.id)
    await replay.finished()
    assert replay.seqs == [1, 2]
    past_the_end = Watcher(jobs, job.id, after_seq=2)
    await past_the_end.finished()
    assert past_the_end.seqs == []


async def test_watch_of_a_retried_job_continues_past_the_old_terminal_event(jobs, db) -> None:
    job = await submit(jobs)
    await jobs.Cancel(pb.CancelRequest(job_id=job.id))
    await jobs.Retry(pb.RetryRequest(job_id=job.id))
    watcher = Watcher(jobs, job.id)
    await watcher.wait_for_seq(3)
    assert not watcher.task.done()
    await jobs.Cancel(pb.CancelRequest(job_id=job.id))
    await watcher.finished()
    assert watcher.seqs == [1, 2, 3, 4]


async def test_watch_bad_requests(jobs) -> None:
    for request, code in [
        (pb.WatchProgressRequest(job_id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.WatchProgressRequest(job_id="00000000-0000-0000-0000-000000000000"),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in jobs.WatchProgress(request):
                pass
        assert err.value.code() == code


async def test_watchers_survive_a_lost_listen_connection(jobs, db, control) -> None:
    job = await submit(jobs)
    watcher = Watcher(jobs, job.id)
    await watcher.wait_for_seq(1)
    async with db.session() as s, s.begin():
        killed = await s.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        )
        assert killed.all(), "no LISTEN connection found"
    await wait_until(lambda: control.notifier.reconnects == 1, timeout=10)
    await move(db, job.id, "queued", "running", attempt=1)
    await watcher.wait_for_seq(2)
    await move(db, job.id, "running", "succeeded", attempt=1)
    await watcher.finished()
    assert watcher.seqs == [1, 2, 3]


async def test_watchers_share_one_feed_and_a_slow_one_catches_up(jobs, db, database_url) -> None:
    """Service level: 300 events pile up behind a watcher that stopped reading."""
    job = await submit(jobs)
    notifier = Notifier(db.url)
    await notifier.start()
    service = JobsService(db, notifier, Settings())
    try:
        fast = service.watch("acme", uuid.UUID(job.id), 0)
        slow = service.watch("acme", uuid.UUID(job.id), 0)
        assert (await anext(fast))["seq"] == 1
        assert (await anext(slow))["seq"] == 1
        assert service.feeds.stats() == {"feeds": 1, "watchers": 2}
        for _ in range(150):
            await move(db, job.id, "queued", "running", attempt=1)
            await move(db, job.id, "running", "queued", attempt=1)
        fast_seqs = [(await anext(fast))["seq"] for _ in range(300)]
        await wait_until(lambda: service.feeds._feeds[uuid.UUID(job.id)]._last_seq == 301)
        slow_seqs = [(await anext(slow))["seq"] for _ in range(300)]
        assert fast_seqs == slow_seqs == list(range(2, 302))
        await move(db, job.id, "queued", "canceled", attempt=1)
        assert [e["seq"] async for e in fast] == [302]
        assert [e["seq"] async for e in slow] == [302]
        assert service.feeds.stats() == {"feeds": 0, "watchers": 0}
    finally:
        await service.feeds.close()
        await notifier.stop()


async def _apply_progress_then_completion(db, job_id: str) -> tuple[dict, dict]:
    """Play this replica's worker stream: progress, then the outcome, each committed."""
    async with db.autocommit() as s:
        (progress,) = await dispatch_store.write_progress(
            s, "w", [(job_id, 1, {"done": 1, "total": 2})], utcnow()
        )
        (done,) = await dispatch_store.complete_attempts(
            s, "w", [(job_id, 1, {"ok": True}, [])], utcnow()
        )
    return dict(progress), done.event


async def _stored_events(db, job_id: str, after_seq: int) -> list[dict]:
    async with db.autocommit() as s:
        return [dict(e) for e in await events_store.list_events(s, uuid.UUID(job_id), after_seq)]


async def test_events_this_replica_commits_reach_its_watchers_without_a_read(jobs, db) -> None:
    """Handed over by the writer (Notifier.publish_events): no NOTIFY, no read back."""
    job = await submit(jobs)
    await move(db, job.id, "queued", "running", attempt=1, worker_id="w")
    notifier = Notifier(db.url)  # never started: no NOTIFY can reach this service
    service = JobsService(db, notifier, Settings())
    watch = service.watch("acme", uuid.UUID(job.id), 0)
    try:
        assert [(await anext(watch))["seq"] for _ in range(2)] == [1, 2]  # the history
        progress, done = await _apply_progress_then_completion(db, job.id)
        notifier.publish_events(iter([progress, done]))
        got = [dict(await asyncio.wait_for(anext(watch), 1.0)) for _ in range(2)]
        # Exactly the rows a read of the history gives, and the watch ends after them.
        assert got == await _stored_events(db, job.id, 2)
        assert [e["kind"] for e in got] == ["progress", "state"]
        assert [e async for e in watch] == []
    finally:
        await watch.aclose()
        await service.feeds.close()


async def test_an_event_handed_over_out_of_order_waits_for_the_read(jobs, db) -> None:
    """A gap in seq (the progress was not handed over): the feed reads, in order, once each."""
    job = await submit(jobs)
    await move(db, job.id, "queued", "running", attempt=1, worker_id="w")
    notifier = Notifier(db.url)
    service = JobsService(db, notifier, Settings())
    watch = service.watch("acme", uuid.UUID(job.id), 0)
    try:
        assert [(await anext(watch))["seq"] for _ in range(2)] == [1, 2]
        progress, done = await _apply_progress_then_completion(db, job.id)
        notifier.publish_events([done])  # seq 4 after 2: not handed on
        next_event = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        assert not next_event.done()
        notifier.publish_local(EVENTS_CHANNEL, job.id)  # what the NOTIFY brings: a read
        got = [dict(await asyncio.wait_for(next_event, 1.0))]
        notifier.publish_events([progress, done])  # late: already read, not repeated
        got += [dict(e) async for e in watch]
        assert got == await _stored_events(db, job.id, 2)
    finally:
        await watch.aclose()
        await service.feeds.close()


async def test_a_watchers_inbox_wakes_on_an_event_times_out_and_marks_overflow() -> None:
    """The per-watcher inbox (control.services.feeds.WatcherQueue), alone."""
    from control.services.feeds import WATCHER_QUEUE_SIZE, WatcherQueue

    inbox = WatcherQueue()
    assert await inbox.next(0.01) is None  # nothing came: the watcher looks at the database
    waiting = asyncio.create_task(inbox.next(5.0))
    await asyncio.sleep(0)
    inbox.offer({"seq": 1})
    assert await asyncio.wait_for(waiting, 1.0) == {"seq": 1}  # woken at once, not at 5 s
    for seq in range(2, 2 + WATCHER_QUEUE_SIZE + 1):
        inbox.offer({"seq": seq})
    assert await inbox.next(0.01) == {"seq": 2}  # in order; the one past the bound was dropped
    assert inbox.take_lag() and not inbox.take_lag()  # so it must re-read, once
    assert await inbox.next(0.01) is None  # and the queue restarts empty
