"""The handler harness (worker.testing) and the debug handlers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from worker.handlers import isolation_of, load_handlers
from worker.handlers.debug import Noop, Sleep
from worker.sdk import Handler, JobContext, PermanentError, RetryableError
from worker.testing import FakeJobContext, run_handler


class CopyParams(BaseModel):
    suffix: str = "!"


class Copy(Handler):
    """Reads input 0, writes output "out.txt"; counts setup calls."""

    name = "test.copy"
    Params = CopyParams
    setups = 0

    def setup(self, device: str) -> None:
        type(self).setups += 1
        self.device = device

    def run(self, ctx: JobContext, params: CopyParams) -> dict:
        text = ctx.input_path(0).read_text()
        ctx.progress(0.5, stage="copying")
        ctx.output_path("out.txt").write_text(text + params.suffix)
        ctx.progress(1.0, stage="done", message="copied")
        return {"device": self.device, "len": len(text)}


class Boom(Handler):
    name = "test.boom"
    Params = CopyParams

    def run(self, ctx: JobContext, params: CopyParams) -> dict:
        raise ZeroDivisionError("nope")


def test_noop_returns_empty_result():
    res = run_handler(Noop(), {})
    assert res.result == {} and res.error is None and not res.cancelled


def test_sleep_reports_every_step_uncoalesced():
    res = run_handler(Sleep(), {"duration": 0.05, "steps": 5, "echo": {"a": 1}})
    assert res.error is None
    assert res.result == {"slept_s": 0.05, "steps": 5, "echo": {"a": 1}}
    assert [p["done"] for p in res.progress] == [1, 2, 3, 4, 5]
    assert res.progress[-1]["fraction"] == 1.0
    assert res.progress[-1]["unit"] == "steps" and res.progress[-1]["total"] == 5
    assert res.progress[0]["rate"] > 0 and res.progress[-1]["eta_s"] == 0


def test_sleep_fail_at_retryable_and_permanent():
    res = run_handler(Sleep, {"duration": 0, "steps": 4, "fail_at": 3, "retry_delay": 2.5})
    assert isinstance(res.error, RetryableError) and res.error.retryable
    assert res.error.code == "DEBUG_FAIL" and res.error.retry_delay_s == 2.5
    assert len(res.progress) == 2
    res = run_handler(Sleep, {"duration": 0, "steps": 4, "fail_at": 1, "fail_permanent": True})
    assert isinstance(res.error, PermanentError) and not res.error.retryable


def test_sleep_cancel_after():
    t0 = time.monotonic()
    res = run_handler(Sleep(), {"duration": 10, "steps": 10}, cancel_after_s=0.1)
    assert res.cancelled and res.result is None and res.error is None
    assert time.monotonic() - t0 < 2


def test_sleep_ignore_cancel_keeps_going():
    res = run_handler(
        Sleep(), {"duration": 0.3, "steps": 3, "ignore_cancel": True}, cancel_after_s=0.05
    )
    assert not res.cancelled and res.result is not None
    assert res.ctx is not None and res.ctx.cancelled


def test_invalid_params_is_permanent_naming_the_field():
    res = run_handler(Sleep(), {"duration": -1})
    assert isinstance(res.error, PermanentError) and res.error.code == "INVALID_PARAMS"
    assert "duration" in res.error.message
    res = run_handler(Sleep(), {"bogus": 1})
    assert res.error is not None and "bogus" in res.error.message


def test_inputs_outputs_and_setup(tmp_path: Path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    Copy.setups = 0
    res = run_handler(Copy(), {"suffix": "?"}, inputs=[src.as_uri()], workdir=tmp_path / "w")
    assert res.error is None, res.traceback
    assert res.result == {"device": "cpu", "len": 5}
    assert Copy.setups == 1
    assert res.outputs == {"out.txt": tmp_path / "w" / "outputs" / "out.txt"}
    assert res.outputs["out.txt"].read_text() == "hello?"
    assert [p["stage"] for p in res.progress] == ["copying", "done"]
    # A plain local path works too.
    res = run_handler(Copy(), {}, inputs=[str(src)], workdir=tmp_path / "w2")
    assert res.outputs["out.txt"].read_text() == "hello!"


def test_missing_input_and_unsupported_scheme(tmp_path: Path):
    res = run_handler(Copy(), {}, inputs=[str(tmp_path / "nope.txt")])
    assert isinstance(res.error, PermanentError) and res.error.code == "INPUT_NOT_FOUND"
    res = run_handler(Copy(), {}, inputs=[])
    assert isinstance(res.error, PermanentError) and res.error.code == "INVALID_INPUT"


def test_unexpected_exception_becomes_retryable_handler_error():
    res = run_handler(Boom(), {})
    assert isinstance(res.error, RetryableError) and res.error.code == "HANDLER_ERROR"
    assert "ZeroDivisionError" in res.error.message
    assert isinstance(res.error.__cause__, ZeroDivisionError)
    assert res.traceback and "ZeroDivisionError" in res.traceback


def test_fake_context_cancel_from_another_thread(tmp_path: Path):
    ctx = FakeJobContext(workdir=tmp_path)
    threading.Timer(0.05, ctx.cancel).start()
    res = run_handler(Sleep(), {"duration": 5, "steps": 5}, ctx=ctx)
    assert res.cancelled


def test_output_name_must_be_plain(tmp_path: Path):
    ctx = FakeJobContext(workdir=tmp_path)
    with pytest.raises(ValueError):
        ctx.output_path("../escape")
    assert ctx.output_path("a.mp4") == tmp_path / "outputs" / "a.mp4"


def test_registry_has_debug_types_and_filters():
    reg = load_handlers("", optional=False)
    assert reg["debug.sleep"] is Sleep and reg["debug.noop"] is Noop
    reg = load_handlers(["test_worker_harness:Copy"], types=["test.copy"])
    assert list(reg) == ["test.copy"]
    with pytest.raises(ModuleNotFoundError):
        load_handlers("no_such_module_xyz:Thing", optional=False)


def test_async_handlers_are_awaited_and_checked_at_registration():
    from spool_test_handlers import AsyncSleep

    res = run_handler(AsyncSleep(), {"duration": 0.02, "steps": 2})
    assert res.error is None and res.result["thread"] == "MainThread"
    assert [p["done"] for p in res.progress] == [1, 2]
    assert run_handler(AsyncSleep(), {"fail": True}).error.code == "ASYNC_FAIL"

    class NotAsync(Sleep):
        name = "test.not_async"
        isolation = "async"

    class NotThread(AsyncSleep):
        name = "test.not_thread"
        isolation = "thread"

    assert isolation_of("test.async_sleep", AsyncSleep) == "async"
    for cls in (NotAsync, NotThread):
        with pytest.raises(ValueError, match='isolation "async"'):
            isolation_of(cls.name, cls)
