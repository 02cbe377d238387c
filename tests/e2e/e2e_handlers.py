"""Handlers of the end-to-end tests (loaded by `spool-worker` via SPOOL_WORKER_HANDLERS).

`e2e.tick` appends a line to a file every `interval` seconds while it runs, so a
test can see from outside whether the handler is still doing work.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from worker.sdk import Handler, JobContext


class TickParams(BaseModel):
    path: str
    duration: float = 30.0
    interval: float = 0.02
    ignore_cancel: bool = False


class Tick(Handler):
    """Append `<pid> <monotonic time>` to `path` every `interval` until done (or cancelled)."""

    name = "e2e.tick"
    Params = TickParams

    def run(self, ctx: JobContext, params: TickParams) -> dict:
        end = time.monotonic() + params.duration
        n = 0
        with open(params.path, "a") as f:
            while time.monotonic() < end:
                if not params.ignore_cancel:
                    ctx.check_cancelled()
                n += 1
                f.write(f"{os.getpid()} {time.monotonic():.3f}\n")
                f.flush()
                ctx.progress(min(1.0, n * params.interval / params.duration), stage="ticking")
                time.sleep(params.interval)
        return {"ticks": n}


class ThreadTick(Tick):
    """`e2e.tick` on a thread of the worker process (`isolation = "thread"`)."""

    name = "e2e.thread_tick"
    isolation = "thread"


class TextParams(BaseModel):
    text: str


class ThreadText(Handler):
    """Writes `text` to output "out.txt" from a worker thread (uploaded to BlobService)."""

    name = "e2e.thread_text"
    Params = TextParams
    isolation = "thread"

    def run(self, ctx: JobContext, params: TextParams) -> dict:
        ctx.output_path("out.txt").write_text(params.text)
        return {"bytes": len(params.text)}
