"""The worker agent against a scripted WorkerService peer over a real grpc.aio stream."""

from __future__ import annotations

import time

from fake_control import FakeControl, make_job, wait_until
from google.protobuf import duration_pb2, json_format


def _kinds(stream) -> list[str]:
    return [m.WhichOneof("message") for _, m in stream.received]


async def test_runs_jobs_within_credits_and_heartbeats(control: FakeControl, start_agent):
    agent = await start_agent(control, slots=2)
    keys = [
        control.submit(make_job("debug.sleep", {"duration": 0.3, "steps": 3, "echo": i}))
        for i in range(6)
    ]
    await wait_until(lambda: all(k in control.results for k in keys), what="6 results")
    assert control.violations == []
    for i, k in enumerate(keys):
        res = control.results[k]
        assert res.WhichOneof("message") == "completed"
        assert json_format.MessageToDict(res.completed.result)["echo"] == i
    hello = control.current.hello
    assert hello.worker_id == "w-0" and hello.slots == 2
    assert {"debug.sleep", "debug.noop", "test.probe"} <= set(hello.job_types)
    assert hello.device.kind == "cpu" and hello.version
    # Credits: one per ready slot at first, then one per freed slot.
    readies = control.messages("ready")
    assert readies[0].credits in (1, 2) and sum(r.credits for r in readies) <= 2 + len(keys)
    # Heartbeats named the attempts that were running.
    beats = control.messages("heartbeat")
    named = {(r.job_id, r.attempt) for b in beats for r in b.running}
    assert beats and named and named <= set(keys)
    assert agent.stats["assigned"] == 6 and agent.stats["released"] == 0


async def test_progress_coalesced_final_value_before_result(control: FakeControl, start_agent):
    await start_agent(control, slots=1)
    key = control.submit(make_job("test.chatty", {"seconds": 1.0, "n": 1_000_000}))
    await wait_until(lambda: key in control.results, what="chatty result")
    stream = control.current
    updates = [(t, m.progress) for t, m in stream.received if m.WhichOneof("message") == "progress"]
    # Hundreds of thousands of ctx.progress calls; at most ~5 per second on the stream.
    span = updates[-1][0] - updates[0][0]
    assert 3 <= len(updates) <= span / 0.2 + 3, len(updates)
    final = updates[-1][1]
    assert final.ref.job_id == key[0]
    assert final.progress.stage == "final" and final.progress.fraction == 1.0
    assert final.progress.unit == "items" and final.progress.total == 1_000_000
    assert final.progress.HasField("update_time")
    kinds = _kinds(stream)
    assert kinds.index("completed") > max(i for i, k in enumerate(kinds) if k == "progress")


async def test_cancel_reaches_handler_and_forced_stop(control: FakeControl, start_agent):
    agent = await start_agent(control, slots=1)
    key = control.submit(make_job("debug.sleep", {"duration": 30, "steps": 300}))
    await wait_until(lambda: control.messages("progress"), what="first progress")
    t0 = time.monotonic()
    control.cancel(key, grace_s=5)
    await wait_until(lambda: key in control.results, what="canceled")
    cancel_s = time.monotonic() - t0
    assert control.results[key].WhichOneof("message") == "canceled"
    assert cancel_s < 1.0, cancel_s

    # A handler ignoring the cancel is killed after the grace; the slot comes back.
    pids = []
    probe = control.submit(make_job("test.probe"))
    await wait_until(lambda: probe in control.results)
    pids.append(json_format.MessageToDict(control.results[probe].completed.result)["pid"])
    key = control.submit(
        make_job("debug.sleep", {"duration": 30, "steps": 30, "ignore_cancel": True})
    )
    await wait_until(lambda: key in control.running and key in agent.jobs)
    t0 = time.monotonic()
    control.cancel(key, grace_s=0.3)
    await wait_until(lambda: key in control.results, what="forced stop")
    assert 0.3 <= time.monotonic() - t0 < 3
    assert control.results[key].WhichOneof("message") == "canceled"
    assert agent.stats["killed"] == 1
    probe = control.submit(make_job("test.probe"))
    await wait_until(lambda: probe in control.results, what="job after forced stop")
    after = json_format.MessageToDict(control.results[probe].completed.result)
    assert after["pid"] not in pids and after["setups"] == 1
    assert control.violations == []


async def test_failures_fail_only_their_job(control: FakeControl, start_agent):
    await start_agent(control, slots=2)
    retry = control.submit(
        make_job("debug.sleep", {"duration": 0, "steps": 3, "fail_at": 2, "retry_delay": 1.5})
    )
    perm = control.submit(
        make_job("debug.sleep", {"duration": 0, "steps": 3, "fail_at": 1, "fail_permanent": True})
    )
    boom = control.submit(make_job("test.boom"))
    bad = control.submit(make_job("debug.sleep", {"duration": "long"}))
    crash = control.submit(make_job("test.crash"))
    ok = control.submit(make_job("debug.noop"))
    keys = [retry, perm, boom, bad, crash, ok]
    await wait_until(lambda: all(k in control.results for k in keys), what="all results")
    f = control.results[retry].failed
    assert f.error.code == "DEBUG_FAIL" and f.error.retryable
    assert f.retry_delay == duration_pb2.Duration(seconds=1, nanos=500_000_000)
    f = control.results[perm].failed
    assert f.error.code == "DEBUG_FAIL" and not f.error.retryable
    f = control.results[boom].failed
    assert f.error.code == "HANDLER_ERROR" and f.error.message == "ValueError: kaboom"
    f = control.results[bad].failed
    assert f.error.code == "INVALID_PARAMS" and "duration" in f.error.message
    assert not f.error.retryable
    f = control.results[crash].failed
    assert f.error.code == "WORKER_CRASH" and f.error.retryable
    assert control.results[ok].WhichOneof("message") == "completed"
    assert control.violations == []


async def test_local_timeout_backstop(control: FakeControl, start_agent, monkeypatch):
    monkeypatch.setattr("worker._attempts.LOCAL_TIMEOUT_MARGIN_S", 0.1)
    await start_agent(control, slots=1)
    job = make_job("debug.sleep", {"duration": 30, "steps": 30})
    job.timeout.FromNanoseconds(300_000_000)
    key = control.submit(job)
    await wait_until(lambda: key in control.results, what="timeout")
    f = control.results[key].failed
    assert f.error.code == "DEADLINE_EXCEEDED" and f.error.retryable


async def test_reconnect_keeps_running_jobs_and_reports_them(control: FakeControl, start_agent):
    agent = await start_agent(control, slots=2)
    await wait_until(lambda: control.streams and control.current.credits == 2, what="2 credits")
    key = control.submit(make_job("debug.sleep", {"duration": 2.0, "steps": 4}))
    short = control.submit(make_job("debug.sleep", {"duration": 0.3, "steps": 2}))
    await wait_until(lambda: key in agent.jobs and short in agent.jobs, what="jobs started")
    port = control.port
    await control.stop()
    await wait_until(lambda: not agent._connected, what="disconnect seen")
    # The short job ends while no stream is up: its result waits for the next one.
    await wait_until(lambda: agent.jobs[short].finished, what="short job done offline")
    again = FakeControl()
    await again.start(port)
    try:
        await wait_until(lambda: again.streams and again.current.hello, what="reconnect")
        running = {(r.job_id, r.attempt) for r in again.current.hello.running}
        assert running == {key, short}
        await wait_until(lambda: key in again.results and short in again.results)
        assert again.results[key].WhichOneof("message") == "completed"
        assert again.results[short].WhichOneof("message") == "completed"
        assert short not in control.results and again.violations == []
        # It keeps serving on the new stream.
        nxt = again.submit(make_job("debug.noop"))
        await wait_until(lambda: nxt in again.results)
    finally:
        await again.stop()


async def test_drain_from_control_releases_unfinished(control: FakeControl, start_agent):
    import asyncio

    agent = await start_agent(control, slots=2, drain_grace_s=0.5)
    short = control.submit(make_job("debug.sleep", {"duration": 0.2, "steps": 2}))
    long = control.submit(
        make_job("debug.sleep", {"duration": 30, "steps": 30, "ignore_cancel": True})
    )
    await wait_until(lambda: short in agent.jobs and long in agent.jobs)
    # Record, at the moment the agent stops, whether its stream had already ended.
    ended_before_stop = []
    stop = agent._stopped.set
    agent._stopped.set = lambda: (ended_before_stop.append(control.current.half_closed), stop())
    control.drain()
    await wait_until(lambda: short in control.results and long in control.results, what="drain")
    assert control.results[short].WhichOneof("message") == "completed"
    rel = control.results[long]
    assert rel.WhichOneof("message") == "released" and rel.released.reason
    await wait_until(lambda: agent._stopped.is_set())
    # It half-closed the stream and waited for control to end it: control read
    # every message before the worker went (a cancelled call can drop the last ones).
    assert ended_before_stop == [True]
    await asyncio.sleep(0)  # the agent task ends; the fixture awaits it


async def test_an_unacknowledged_result_is_resent_after_a_reconnect(
    control: FakeControl, start_agent
):
    """Control may die before it commits an outcome: the worker keeps it until the Ack."""
    agent = await start_agent(control, slots=1)
    control.ack_outcomes = False
    key = control.submit(make_job("test.probe"))
    await wait_until(lambda: key in control.results, what="first result")
    sent = json_format.MessageToDict(control.results[key].completed.result)
    assert key in agent.jobs  # written, not acknowledged: still held
    first = control.current
    first.out.put_nowait(None)  # the stream ends before any Ack
    await wait_until(lambda: len(control.streams) > 1 and control.current.hello is not None)
    second = control.current
    # The new stream's Hello still names the attempt (its lease is kept) ...
    assert key in {(r.job_id, r.attempt) for r in second.hello.running}
    # ... and the outcome comes again on it.
    await wait_until(lambda: key in control.resent, what="resent result")
    resent = [m.completed for _, m in second.received if m.WhichOneof("message") == "completed"]
    assert resent and json_format.MessageToDict(resent[-1].result) == sent
    control.ack(key)
    await wait_until(lambda: key not in agent.jobs, what="forgotten after the Ack")
    assert control.violations == []


async def test_a_result_that_cannot_be_sent_fails_the_attempt(control: FakeControl, start_agent):
    """Odd values from a handler never stop the stream: NaN progress is cleaned on the way."""
    await start_agent(control, slots=1)
    key = control.submit(make_job("test.odd"))
    await wait_until(lambda: key in control.results, what="odd result")
    res = control.results[key]
    assert res.WhichOneof("message") == "failed", res
    assert res.failed.error.code == "INVALID_RESULT" and not res.failed.error.retryable
    progress = control.messages("progress")[-1].progress
    assert progress.fraction == 0 and progress.message == "nul\x00inside"
    later = control.submit(make_job("debug.noop"))
    await wait_until(lambda: later in control.results, what="the next job")


async def test_thread_and_process_jobs_ignoring_cancel_are_both_stopped(
    control: FakeControl, start_agent
):
    """A thread cannot be killed: it is reported Canceled at once all the same."""
    agent = await start_agent(control, slots=2)
    stubborn = {"duration": 3, "steps": 30, "ignore_cancel": True}
    on_thread = control.submit(make_job("test.thread_sleep", stubborn))
    in_slot = control.submit(make_job("debug.sleep", stubborn))
    await wait_until(lambda: on_thread in agent.jobs and in_slot in agent.jobs)
    await wait_until(lambda: len(control.messages("progress")) >= 2, what="progress of both")
    t0 = time.monotonic()
    control.cancel(on_thread, grace_s=0.3)
    control.cancel(in_slot, grace_s=0.3)
    await wait_until(lambda: on_thread in control.results and in_slot in control.results)
    assert 0.3 <= time.monotonic() - t0 < 3
    assert control.results[on_thread].WhichOneof("message") == "canceled"
    assert control.results[in_slot].WhichOneof("message") == "canceled"
    assert agent.stats["killed"] == 2 and agent.pool.abandoned_threads() == 1
    # Both slots serve on, while the abandoned thread still sleeps.
    keys = [control.submit(make_job(t)) for t in ("test.thread_probe", "debug.noop") * 3]
    keys.append(control.submit(make_job("test.probe")))
    await wait_until(lambda: all(k in control.results for k in keys), what="jobs after")
    assert all(control.results[k].WhichOneof("message") == "completed" for k in keys)
    assert control.violations == []  # never more jobs than slots, threads included
