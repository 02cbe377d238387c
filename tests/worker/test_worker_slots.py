"""Slot subprocesses: setup once, forced stop, crashes and failures stay local."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from worker._slot_child import CHILD_PROGRESS_INTERVAL_S
from worker._slots import SlotCallbacks, SlotPool

TEST_HANDLERS = "spool_test_handlers"
TEST_TYPES = ["debug.sleep", "debug.noop", "test.probe", "test.boom", "test.crash",
              "test.chatty", "test.writer"]  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.idle = 0
        self.progress: dict[tuple, list] = {}
        self.done: dict[tuple, dict] = {}

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
async def pool(tmp_path: Path):
    rec = Recorder()
    config = {"handlers": TEST_HANDLERS, "device": "cpu", "workdir_root": str(tmp_path),
              "types": TEST_TYPES, "log_level": "WARNING", "file_root": str(tmp_path)}  # fmt: skip
    p = SlotPool(1, config, rec.callbacks())
    p.rec = rec  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        await p.stop()


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
        assert rec.done[key]["status"] == "completed"
        assert rec.done[key]["result"]["setups"] == 1
        pids.append(rec.done[key]["result"]["pid"])
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
    assert rec.done[key] == {"status": "killed"}
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("after", 1)
    pool.start_job(key, job("after", "test.probe"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key]["result"]["pid"] not in pids
    assert rec.done[key]["result"]["setups"] == 1


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
    assert rec.done[key]["status"] == "cancelled"
    assert time.monotonic() - t0 < 2.0

    await wait_for(lambda: pool.idle_count() == 1)
    key = ("b", 1)
    pool.start_job(key, job("b", "test.boom"))
    await wait_for(lambda: key in rec.done)
    out = rec.done[key]
    assert out["status"] == "failed" and out["code"] == "HANDLER_ERROR" and out["retryable"]
    assert out["message"] == "ValueError: kaboom"

    key = ("v", 1)
    pool.start_job(key, job("v", "debug.sleep", {"duration": "soon"}))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key]["code"] == "INVALID_PARAMS" and not rec.done[key]["retryable"]

    key = ("f", 1)
    pool.start_job(key, job("f", "debug.sleep", {"duration": 0, "steps": 2, "fail_at": 2,
                                                 "fail_permanent": True}))  # fmt: skip
    await wait_for(lambda: key in rec.done)
    assert rec.done[key]["code"] == "DEBUG_FAIL" and not rec.done[key]["retryable"]

    src = tmp_path / "in.bin"
    src.write_bytes(b"abc")
    key = ("w", 1)
    pool.start_job(key, job("w", "test.writer", inputs=[src.as_uri()]))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key]["status"] == "completed", rec.done[key]
    assert len(rec.done[key]["outputs"]) == 1

    # The process dies under a handler: that job fails, the slot comes back.
    key = ("x", 1)
    pool.start_job(key, job("x", "test.crash"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key]["status"] == "crashed"
    await wait_for(lambda: pool.idle_count() == 1)
    key = ("ok", 1)
    pool.start_job(key, job("ok", "debug.noop"))
    await wait_for(lambda: key in rec.done)
    assert rec.done[key] == {"status": "completed", "result": {}, "outputs": []}


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
