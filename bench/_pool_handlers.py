"""No-op job types for `bench.slot_pool`, one per place a job can run.

They subclass `debug.noop` and pin `isolation`, so the bench compares the
same handler on a thread and in a slot process, with and without a work
directory. On code without `Handler.isolation` the attribute is ignored
(everything runs in a slot process), which lets the same bench measure it.
"""

from __future__ import annotations

from typing import Any

from worker.handlers.debug import Noop, NoopParams
from worker.sdk import JobContext


class NoopProcess(Noop):
    name = "bench.noop_process"
    isolation = "process"


class NoopThread(Noop):
    name = "bench.noop_thread"
    isolation = "thread"


class WorkdirProcess(Noop):
    """Touches `ctx.workdir`: what every job paid before it was made on first use."""

    name = "bench.workdir_process"
    isolation = "process"

    def run(self, ctx: JobContext, params: NoopParams) -> dict[str, Any]:
        ctx.workdir  # noqa: B018 - the access is the point
        return {}


class WorkdirThread(WorkdirProcess):
    name = "bench.workdir_thread"
    isolation = "thread"
