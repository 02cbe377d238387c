"""Slot subprocesses: setup once, forced stop, crashes and failures stay local."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from worker._outcome import Outcome
from worker._slot_child import CHILD_PROGRESS_INTERVAL_S
from worker._slots import SlotCallbacks, SlotPool

TEST_HANDLERS = "spool_test_handlers"
TEST_TYPES = ["debug.sleep", "debug.noop", "test.probe", "test.boom", "test.crash",
              "test.chatty", "test.writer",
              "test.thread_probe", "test.thread_sleep", "test.thread_chatty",
              "test.thread_writer", "test.async_sleep"]  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.idle = 0
        self.progress: dict[tuple, list] = {}
        self.done: dict[tuple, Outcome] = {}

    def callbacks(self) -> SlotCallbacks:
        return SlotCallbacks(
            on_idle=self._on_idle,
            on_progress=lambda k, p: self.progress.setdefault(k, []).append(p),
            on_done=self.done.__setitem__,
        )

    def _on_idle(self) -> None:
        self.idle += 1


async def wait_for(cond, limit_s: float = 15.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def job(job_id: str, type_: str, params: dict | None = None, inputs=()) -> dict:
    return {"job_id": job_id, "attempt": 1, "type": type_, "params": params or {},
            "inputs": list(inputs), "tenant": "t"}  # fmt: skip


@pytest.fixture
async def make_pool(tmp_path: Path):
    """Factory: a SlotPool (not started) with a Recorder as `.rec`; stopped after the test."""
    made: list[SlotPool] = []

    def make(slots: int = 1, types: list[str] = TEST_TYPES) -> SlotPool:
        config = {"handlers": TEST_HANDLERS, "device": "cpu",
                  "workdir_root": str(tmp_path / "work"), "types": types,
                  "log_level": "WARNING", "file_root": str(tmp_path)}  # fmt: skip
        rec = Recorder()
        p = SlotPool(slots, config, rec.callbacks())
        p.rec = rec  # type: ignore[attr-defined]
        made.append(p)
        return p

    yield make
    for p in made:
        await p.stop()


@pytest.fixture
async def pool(make_pool):
    return make_pool()


async def test_setup_once_across_jobs_and_restart_after_forced_stop(pool: SlotPool):
    rec = pool.rec  # type: ignore[attr-defined]
    info = await pool.start()
    assert {"debug.sleep", "debug.noop", "test.probe"} <= set(info["types"])
    assert info["device"]["device"] == "cpu"
    await wait_for(lambda: pool.idle_count() == 1)
    pids = []
    for i in range(3):
        key = (f"p{i}", 1)
        assert pool.start_job(key, job(key[0], "test.probe")) is not None
        await wait_for(lambda k=key: k in rec.done)
        assert rec.done[key].status == "completed"
        assert rec.done[key].result["setups"] == 1
        pids.append(rec.done[key].result["pid"])
    assert len(set(pids)) == 1

    # A handler that ignores cancel: the flag is set, it keeps going, it is killed.
    key = ("stubborn", 1)
    pool.start_job(key, job("stubborn", "debug.sleep",
                            {"duration": 30, "steps": 30, "ignore_cancel": True}))  # fmt: skip
    await asyncio.sleep(0.2)
    assert pool.cancel(key)
    await asyncio.sleep(0.2)
    assert key not in rec.done
    assert pool.kill_job(key)
    assert rec.done[key] == Outcome.killed()
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("after", 1)
    pool.start_job(key, job("after", "test.probe"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].result["pid"] not in pids
    assert rec.done[key].result["setups"] == 1


async def test_cooperative_cancel_and_failures_stay_local(pool: SlotPool, tmp_path: Path):
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 1)

    key = ("c", 1)
    pool.start_job(key, job("c", "debug.sleep", {"duration": 30, "steps": 30}))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    pool.cancel(key)
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].status == "cancelled"
    assert time.monotonic() - t0 < 2.0

    await wait_for(lambda: pool.idle_count() == 1)
    key = ("b", 1)
    pool.start_job(key, job("b", "test.boom"))
    await wait_for(lambda: key in rec.done)
    out = rec.done[key]
    assert out.status == "failed" and out.code == "HANDLER_ERROR" and out.retryable
    assert out.message == "ValueError: kaboom"

    key = ("v", 1)
    pool.start_job(key, job("v", "debug.sleep", {"duration": "soon"}))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].code == "INVALID_PARAMS" and not rec.done[key].retryable

    key = ("f", 1)
    pool.start_job(key, job("f", "debug.sleep", {"duration": 0, "steps": 2, "fail_at": 2,
                                                 "fail_permanent": True}))  # fmt: skip
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].code == "DEBUG_FAIL" and not rec.done[key].retryable

    src = tmp_path / "in.bin"
    src.write_bytes(b"abc")
    key = ("w", 1)
    pool.start_job(key, job("w", "test.writer", inputs=[src.as_uri()]))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].status == "completed", rec.done[key]
    assert len(rec.done[key].outputs) == 1

    # The process dies under a handler: that job fails, the slot comes back.
    key = ("x", 1)
    pool.start_job(key, job("x", "test.crash"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].status == "crashed"
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("ok", 1)
    pool.start_job(key, job("ok", "debug.noop"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key] == Outcome.completed({}, [])


async def test_progress_is_coalesced_in_the_slot(pool: SlotPool):
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("chatty", 1)
    pool.start_job(key, job("chatty", "test.chatty", {"seconds": 0.5, "n": 10**6}))
    await wait_for(lambda: key in rec.done)
    reports = rec.progress[key]
    # Many thousands of calls; at most one per CHILD_PROGRESS_INTERVAL_S forwarded, plus
    # the final one.
    span = reports[-1]["time"] - reports[0]["time"]
    assert 3 <= len(reports) <= span / CHILD_PROGRESS_INTERVAL_S + 2
    assert reports[-1]["stage"] == "final" and reports[-1]["fraction"] == 1.0


# -- thread jobs (Handler.isolation = "thread") -------------------------------


async def test_thread_jobs_run_in_this_process_with_coalesced_progress(pool: SlotPool, tmp_path):
    rec = pool.rec  # type: ignore[attr-defined]
    info = await pool.start()
    assert {"test.thread_probe", "debug.noop", "test.probe"} <= set(info["types"])
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("tp", 1)
    assert pool.start_job(key, job("tp", "test.thread_probe")) is not None
    # A slot is a slot: the thread job holds the worker's only one.
    assert pool.busy_count() == 1 and pool.idle_count() == 0
    assert pool.start_job(("more", 1), job("more", "test.probe")) is None
    await wait_for(lambda: key in rec.done)
    out = rec.done[key]
    assert out.status == "completed" and out.outputs == []
    assert out.result["pid"] == os.getpid()
    assert out.result["thread"].startswith("spool-thread-job-")
    assert out.result["setups"] == 1 and out.result["device"] == "cpu"
    assert pool.idle_count() == 1

    # Progress goes through the same coalescing as in a slot, onto the loop.
    key = ("tc", 1)
    pool.start_job(key, job("tc", "test.thread_chatty", {"seconds": 0.5, "n": 10**6}))
    await wait_for(lambda: key in rec.done)
    reports = rec.progress[key]
    span = reports[-1]["time"] - reports[0]["time"]
    assert 3 <= len(reports) <= span / CHILD_PROGRESS_INTERVAL_S + 2
    assert reports[-1]["stage"] == "final" and reports[-1]["fraction"] == 1.0
    assert rec.done[key].result == {"n": 10**6}

    # Outcomes have the slot child's shape: failures, cancel, outputs.
    key = ("tf", 1)
    pool.start_job(key, job("tf", "test.thread_sleep", {"duration": 0, "steps": 2, "fail_at": 1,
                                                        "retry_delay": 2.5}))  # fmt: skip
    await wait_for(lambda: key in rec.done)
    assert rec.done[key] == Outcome.failed("DEBUG_FAIL", "debug.sleep failed at step 1 as asked",
                                           retry_delay_s=2.5)  # fmt: skip
    key = ("tv", 1)
    pool.start_job(key, job("tv", "test.thread_sleep", {"duration": "soon"}))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].code == "INVALID_PARAMS" and not rec.done[key].retryable
    key = ("tx", 1)
    pool.start_job(key, job("tx", "test.thread_sleep", {"duration": 30, "steps": 30}))
    await asyncio.sleep(0.1)
    assert pool.cancel(key)
    await wait_for(lambda: key in rec.done, 2.0)
    assert rec.done[key] == Outcome.cancelled()
    src = tmp_path / "in.bin"
    src.write_bytes(b"abcd")
    key = ("tw", 1)
    pool.start_job(key, job("tw", "test.thread_writer", inputs=[src.as_uri()]))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key].status == "completed", rec.done[key]
    [uri] = rec.done[key].outputs
    kept = tmp_path / "work" / "outputs" / "tw" / "copy.txt"
    assert uri == kept.resolve().as_uri() and kept.read_bytes() == b"abcd"
    # Its work directory (inputs/outputs) was made, then removed.
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["outputs"]


async def test_a_thread_job_ignoring_cancel_is_reported_killed_and_the_slot_serves_on(
    pool: SlotPool,
):
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("stuck", 1)
    pool.start_job(key, job("stuck", "test.thread_sleep",
                            {"duration": 1.5, "steps": 15, "ignore_cancel": True}))  # fmt: skip
    await wait_for(lambda: key in rec.progress)
    assert pool.cancel(key)
    await asyncio.sleep(0.2)
    assert key not in rec.done
    idle_before = rec.idle
    assert pool.kill_job(key)
    # Reported at once; the slot is free at once; the thread runs on, abandoned.
    assert rec.done[key] == Outcome.killed()
    assert pool.busy_count() == 0 and pool.abandoned_threads() == 1
    await wait_for(lambda: rec.idle > idle_before)
    assert not pool.kill_job(key) and not pool.cancel(key)
    progress_seen = len(rec.progress[key])
    for i, type_ in enumerate(["test.thread_probe", "test.probe", "debug.noop"]):
        k = (f"after{i}", 1)
        assert pool.start_job(k, job(k[0], type_)) is not None
        await wait_for(lambda k=k: k in rec.done)
        assert rec.done[k].status == "completed"
    # When the abandoned thread finally returns, what it says is dropped.
    await wait_for(lambda: pool.abandoned_threads() == 0, 5.0)
    await asyncio.sleep(0.05)
    assert rec.done[key] == Outcome.killed()
    assert len(rec.progress[key]) == progress_seen


# -- async jobs (Handler.isolation = "async") --------------------------------


async def test_async_jobs_run_on_the_loop_with_the_same_outcomes(pool: SlotPool):
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("as", 1)
    assert pool.start_job(key, job("as", "test.async_sleep", {"duration": 0.3, "steps": 3}))
    assert pool.busy_count() == 1 and pool.idle_count() == 0  # it holds the slot
    await wait_for(lambda: key in rec.done)
    out = rec.done[key]
    assert out.status == "completed"
    assert out.result["thread"] == "MainThread"  # the loop's own thread: no hop
    assert rec.progress[key][-1]["done"] == 3 and pool.idle_count() == 1
    for job_id, params, want in [
        ("af", {"fail": True}, Outcome.failed("ASYNC_FAIL", "failed as asked", retryable=False)),
        ("ab", {"duration": "soon"}, None),
        ("aj", {"result_of": "not-json"}, None),
    ]:
        k = (job_id, 1)
        pool.start_job(k, job(job_id, "test.async_sleep", params))
        await wait_for(lambda k=k: k in rec.done)
        if want is not None:
            assert rec.done[k] == want
    assert rec.done[("ab", 1)].code == "INVALID_PARAMS"
    assert rec.done[("aj", 1)].code == "INVALID_RESULT"
    key = ("ac", 1)
    pool.start_job(key, job("ac", "test.async_sleep", {"duration": 30, "steps": 300}))
    await asyncio.sleep(0.2)
    assert pool.cancel(key)
    await wait_for(lambda: key in rec.done, 2.0)
    assert rec.done[key] == Outcome.cancelled()


async def test_an_async_job_ignoring_cancel_is_stopped_by_force(pool: SlotPool):
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("stubborn", 1)
    pool.start_job(key, job("stubborn", "test.async_sleep",
                            {"duration": 30, "steps": 300, "ignore_cancel": True}))  # fmt: skip
    await wait_for(lambda: key in rec.progress)
    assert pool.cancel(key)
    await asyncio.sleep(0.2)
    assert key not in rec.done
    assert pool.kill_job(key)
    assert rec.done[key] == Outcome.killed() and pool.busy_count() == 0
    # Its task is cancelled at its next await: nothing is left running.
    await wait_for(lambda: pool.abandoned_threads() == 0, 2.0)
    k = ("next", 1)
    assert pool.start_job(k, job("next", "debug.noop")) is not None
    await wait_for(lambda: k in rec.done)
    assert rec.done[k].status == "completed" and rec.done[key] == Outcome.killed()


async def test_a_process_job_is_still_killed_with_its_slot_next_to_thread_jobs(make_pool):
    pool = make_pool(slots=2)
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 2)
    proc_key, thread_key = ("p", 1), ("t", 1)
    pool.start_job(proc_key, job("p", "debug.sleep", {"duration": 30, "steps": 30,
                                                      "ignore_cancel": True}))  # fmt: skip
    pool.start_job(thread_key, job("t", "test.thread_sleep", {"duration": 30, "steps": 300}))
    assert pool.idle_count() == 0 and pool.busy_count() == 2
    slot = pool.slot_of(proc_key)
    pid = slot.process.pid
    assert pool.kill_job(proc_key)
    assert rec.done[proc_key] == Outcome.killed()
    await wait_for(lambda: slot.state == "idle")
    assert slot.process.pid != pid
    # The thread job did not notice; it still cancels cooperatively.
    assert thread_key not in rec.done
    pool.cancel(thread_key)
    await wait_for(lambda: thread_key in rec.done)
    assert rec.done[thread_key] == Outcome.cancelled()
    await wait_for(lambda: pool.idle_count() == 2)


async def test_only_thread_types_means_no_slot_process(make_pool):
    pool = make_pool(slots=2, types=["debug.noop", "test.thread_probe", "test.thread_sleep"])
    rec = pool.rec  # type: ignore[attr-defined]
    before = set(multiprocessing.active_children())
    info = await pool.start()
    assert info["types"] == ["debug.noop", "test.thread_probe", "test.thread_sleep"]
    assert info["failed"] == {} and info["device"]["device"] == "cpu"
    assert pool.slots == [] and set(multiprocessing.active_children()) == before
    await wait_for(lambda: rec.idle >= 1)
    assert pool.idle_count() == 2 and pool.cuda_memory() == []
    a, b = ("a", 1), ("b", 1)
    for k in (a, b):
        pool.start_job(k, job(k[0], "test.thread_sleep", {"duration": 30, "steps": 300}))
    assert pool.idle_count() == 0 and pool.start_job(("c", 1), job("c", "debug.noop")) is None
    pool.cancel(a)
    await wait_for(lambda: a in rec.done and pool.idle_count() == 1)
    # A type nobody serves here fails like it would in a slot.
    k = ("u", 1)
    pool.start_job(k, job("u", "video.transcode"))
    await wait_for(lambda: k in rec.done)
    assert rec.done[k].code == "UNKNOWN_JOB_TYPE" and not rec.done[k].retryable
    pool.cancel(b)
    await wait_for(lambda: b in rec.done and pool.idle_count() == 2)


async def test_no_work_directory_unless_the_handler_asks(make_pool, tmp_path: Path):
    pool = make_pool(slots=2)
    rec = pool.rec  # type: ignore[attr-defined]
    await pool.start()
    await wait_for(lambda: pool.idle_count() == 2)
    root = tmp_path / "work"
    for i, type_ in enumerate(["debug.noop", "test.probe", "debug.sleep", "test.thread_probe"]):
        k = (f"n{i}", 1)
        pool.start_job(k, job(k[0], type_, {"duration": 0, "steps": 1} if "sleep" in type_ else {}))
        await wait_for(lambda k=k: k in rec.done)
        assert rec.done[k].status == "completed", rec.done[k]
    assert not root.exists()  # not even the root: nothing asked for a directory
    # A handler that touches ctx.workdir gets one, removed after the attempt.
    k = ("touch", 1)
    pool.start_job(k, job("touch", "test.thread_probe", {"touch_workdir": True}))
    await wait_for(lambda: k in rec.done)
    assert rec.done[k].status == "completed"
    assert root.is_dir() and list(root.iterdir()) == []
