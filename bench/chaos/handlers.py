"""The job type of the chaos run: `chaos.step`, loaded by workers via SPOOL_WORKER_HANDLERS.

It sleeps in steps reporting progress (its stage names the attempt, so progress
from a stale attempt is recognisable in the history), may fail retryably on its
first attempts, and before returning appends a marker line to
`$SPOOL_CHAOS_MARKS/<instance>-<pid>.jsonl`: the proof that the handler finished
this attempt, so a result that was sent but never recorded can be counted. The
result names the attempt and the worker process that produced it (fencing check).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from worker.sdk import Handler, JobContext, RetryableError

MARKS_ENV = "SPOOL_CHAOS_MARKS"
INSTANCE_ENV = "SPOOL_CHAOS_INSTANCE"
JOB_TYPE = "chaos.step"
FAIL_CODE = "CHAOS_FAIL"


class StepParams(BaseModel):
    """Parameters of `chaos.step`."""

    model_config = {"extra": "forbid"}

    #: seconds of work
    duration: float = Field(default=0.1, ge=0.0, le=60.0)
    #: progress reports along the way
    steps: int = Field(default=3, ge=1, le=100)
    #: attempts 1..fail_attempts raise a RetryableError at the last step
    fail_attempts: int = Field(default=0, ge=0, le=100)
    #: the retry delay those failures ask for
    retry_delay: float = Field(default=0.1, ge=0.0, le=5.0)
    #: the logical job number given by the client (echoed)
    n: int = 0


def _mark(job_id: str, attempt: int, instance: str) -> None:
    marks = os.environ.get(MARKS_ENV)
    if not marks:
        return
    line = json.dumps({"job": job_id, "attempt": attempt, "instance": instance, "t": time.time()})
    with open(Path(marks) / f"{instance}-{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


class Step(Handler):
    """Sleep `duration` in `steps`, then succeed (or fail retryably on early attempts)."""

    name = JOB_TYPE
    Params = StepParams
    max_attempts = 5

    def run(self, ctx: JobContext, params: StepParams) -> dict[str, Any]:
        instance = os.environ.get(INSTANCE_ENV, "")
        step_s = params.duration / params.steps
        deadline = time.monotonic()
        for step in range(1, params.steps + 1):
            deadline += step_s
            while (left := deadline - time.monotonic()) > 0:
                ctx.check_cancelled()
                time.sleep(min(left, 0.01))
            ctx.check_cancelled()
            if step == params.steps and ctx.attempt <= params.fail_attempts:
                raise RetryableError(
                    f"chaos.step fails attempt {ctx.attempt} as asked",
                    code=FAIL_CODE,
                    retry_delay_s=params.retry_delay,
                )
            ctx.progress(done=step, total=params.steps, unit="steps", stage=f"a{ctx.attempt}")
        _mark(ctx.job_id, ctx.attempt, instance)
        return {
            "job": ctx.job_id,
            "attempt": ctx.attempt,
            "instance": instance,
            "worker": instance.partition("#")[0],
            "n": params.n,
        }
