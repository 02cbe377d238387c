"""Run one handler without a server: the harness for handler unit tests.

    from worker.testing import run_handler

    res = run_handler(MyHandler(), {"seconds": 0.1}, inputs=["clip.mp4"], workdir=tmp_path)
    assert res.error is None and res.result == {...}
    assert res.progress[-1]["fraction"] == 1.0
    assert res.outputs["out.mp4"].exists()

`run_handler` validates params like the worker does, calls `setup(device)` and
then `run(ctx, params)` in the calling thread with a `FakeJobContext`, and
turns the outcome into a `HarnessResult` the way the worker would report it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import tempfile
import threading
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from worker._context import BaseJobContext
from worker._outcome import Progress
from worker.sdk import Cancelled, Handler, JobError, PermanentError, RetryableError


class FakeJobContext(BaseJobContext):
    """A `JobContext` that records every progress call and can be cancelled by hand.

    `input_path()` resolves local paths and `file://` URIs (no allowed-root
    check); `output_path()` writes under `workdir/outputs`.
    """

    def __init__(
        self,
        *,
        inputs: Sequence[str | Path] = (),
        workdir: Path | str | None = None,
        device: str = "cpu",
        job_id: str | None = None,
        attempt: int = 1,
        job_type: str = "test",
        logger: logging.Logger | None = None,
    ) -> None:
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="spool-harness-")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            job_id=job_id or str(uuid.uuid4()),
            attempt=attempt,
            job_type=job_type,
            device=device,
            inputs=[str(i) for i in inputs],
            workdir=workdir,
            logger=logger,
        )
        #: every progress report, in call order, un-coalesced
        self.progress_calls: list[Progress] = []
        self._cancel = threading.Event()

    def _emit_progress(self, progress: Progress) -> None:
        with self._lock:
            self.progress_calls.append(progress)

    @property
    def cancelled(self) -> bool:
        """True once `cancel()` was called."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Simulate a Cancel reaching the job (thread-safe)."""
        self._cancel.set()


@dataclass
class HarnessResult:
    """What one harness run produced, as the worker would report it."""

    #: the handler's return value (None if it failed, was cancelled or returned None)
    result: dict[str, Any] | None = None
    #: the failure as the worker would report it (unexpected exceptions become
    #: a RetryableError with code HANDLER_ERROR whose __cause__ is the original)
    error: JobError | None = None
    #: True if the handler stopped with `Cancelled`
    cancelled: bool = False
    #: every progress report, in call order, un-coalesced
    progress: list[Progress] = field(default_factory=list)
    #: outputs written through `ctx.output_path`, name -> local path
    outputs: dict[str, Path] = field(default_factory=dict)
    #: the formatted traceback of an unexpected exception, for debugging
    traceback: str | None = None
    #: the context the handler ran with
    ctx: FakeJobContext | None = None


def validate_params(handler: Handler, params: dict[str, Any] | None) -> Any:
    """Validate `params` with the handler's schema; invalid → PermanentError(INVALID_PARAMS)."""
    try:
        return handler.Params.model_validate(params or {})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PermanentError(f"invalid params: {problems}", code="INVALID_PARAMS") from exc


def run_handler(
    handler: Handler | type[Handler],
    params: dict[str, Any] | None = None,
    inputs: Sequence[str | Path] = (),
    device: str = "cpu",
    workdir: Path | str | None = None,
    cancel_after_s: float | None = None,
    *,
    ctx: FakeJobContext | None = None,
) -> HarnessResult:
    """Run `handler` once in this thread and report what happened.

    Calls `setup(device)` then `run(ctx, params)` (awaited on a fresh event loop
    for an `async def run`). With `cancel_after_s`, the
    context is cancelled that many seconds after `run` starts. Pass `ctx` to
    control the context yourself (e.g. cancel it from another thread).
    `workdir` defaults to a fresh temporary directory that is left in place
    so outputs can be inspected.
    """
    if isinstance(handler, type):
        handler = handler()
    if ctx is None:
        ctx = FakeJobContext(
            inputs=inputs, workdir=workdir, device=device, job_type=getattr(handler, "name", "test")
        )
    res = HarnessResult(ctx=ctx)
    timer: threading.Timer | None = None
    try:
        parsed = validate_params(handler, params)
        handler.setup(device)
        if cancel_after_s is not None:
            timer = threading.Timer(cancel_after_s, ctx.cancel)
            timer.daemon = True
            timer.start()
        out = handler.run(ctx, parsed)
        if inspect.iscoroutine(out):  # an `isolation = "async"` handler: its own loop here
            out = asyncio.run(out)
        res.result = dict(out) if out is not None else None
    except Cancelled:
        res.cancelled = True
    except JobError as exc:
        res.error = exc
    except Exception as exc:
        res.traceback = traceback.format_exc()
        wrapped = RetryableError(f"{type(exc).__name__}: {exc}", code="HANDLER_ERROR")
        wrapped.__cause__ = exc
        res.error = wrapped
    finally:
        if timer is not None:
            timer.cancel()
    res.progress = list(ctx.progress_calls)
    res.outputs = ctx.outputs()
    return res
