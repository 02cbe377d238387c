"""Built-in job types for tests and demos: `debug.noop` and `debug.sleep`."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from worker.sdk import Handler, JobContext, PermanentError, RetryableError


class NoopParams(BaseModel):
    """`debug.noop` takes any params and ignores them."""

    model_config = {"extra": "allow"}


class Noop(Handler):
    """Return `{}` at once: the cheapest possible job (throughput benchmarks)."""

    name = "debug.noop"
    Params = NoopParams
    #: nothing to kill, crash or block: it runs on the worker's event loop itself
    isolation = "async"

    async def run(self, ctx: JobContext, params: NoopParams) -> dict[str, Any]:
        return {}


class SleepParams(BaseModel):
    """Parameters of `debug.sleep`."""

    model_config = {"extra": "forbid"}

    #: total seconds to sleep
    duration: float = Field(default=1.0, ge=0.0, le=86_400.0)
    #: progress reports (and cancel checks) along the way
    steps: int = Field(default=10, ge=1, le=1_000_000)
    #: raise at this step (1-based) instead of finishing; 0 = never
    fail_at: int = Field(default=0, ge=0)
    #: with fail_at: raise a PermanentError (True) or a RetryableError (False)
    fail_permanent: bool = False
    #: seconds the next attempt must wait after a retryable failure
    retry_delay: float | None = Field(default=None, ge=0.0)
    #: keep sleeping without looking at cancellation (tests forced stop)
    ignore_cancel: bool = False
    #: returned as result["echo"]
    echo: Any = None


class Sleep(Handler):
    """Sleep `duration` seconds in `steps` steps, reporting progress after each.

    It stays a process type: `ignore_cancel` exists to exercise the forced stop
    of a slot process.
    """

    name = "debug.sleep"
    Params = SleepParams

    def run(self, ctx: JobContext, params: SleepParams) -> dict[str, Any]:
        step_s = params.duration / params.steps
        deadline = time.monotonic()
        for step in range(1, params.steps + 1):
            deadline += step_s
            # Sleep in short slices so a cancel is seen within ~10 ms.
            while (left := deadline - time.monotonic()) > 0:
                if not params.ignore_cancel:
                    ctx.check_cancelled()
                time.sleep(min(left, 0.01))
            if not params.ignore_cancel:
                ctx.check_cancelled()
            if step == params.fail_at:
                msg = f"debug.sleep failed at step {step} as asked"
                if params.fail_permanent:
                    raise PermanentError(msg, code="DEBUG_FAIL")
                raise RetryableError(msg, code="DEBUG_FAIL", retry_delay_s=params.retry_delay)
            ctx.progress(done=step, total=params.steps, unit="steps", stage="sleeping")
        return {"slept_s": params.duration, "steps": params.steps, "echo": params.echo}
