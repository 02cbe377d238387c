"""Handlers used by the worker tests (imported in slot processes via SPOOL_WORKER_HANDLERS)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from pydantic import BaseModel

from worker.handlers.debug import Sleep
from worker.sdk import Handler, JobContext, PermanentError

SETUPS = 0


class Params(BaseModel):
    model_config = {"extra": "allow"}


class Probe(Handler):
    """Reports its process and how often setup ran in it."""

    name = "test.probe"
    Params = Params

    def setup(self, device: str) -> None:
        global SETUPS
        SETUPS += 1

    def run(self, ctx: JobContext, params: Params) -> dict:
        return {"pid": os.getpid(), "setups": SETUPS, "device": ctx.device}


class Boom(Handler):
    """Raises an unexpected exception."""

    name = "test.boom"
    Params = Params

    def run(self, ctx: JobContext, params: Params) -> dict:
        raise ValueError("kaboom")


class Crash(Handler):
    """Takes its slot process down hard."""

    name = "test.crash"
    Params = Params

    def run(self, ctx: JobContext, params: Params) -> dict:
        os._exit(3)


class Chatty(Handler):
    """Reports progress as fast as it can (tests coalescing)."""

    name = "test.chatty"
    Params = Params

    def run(self, ctx: JobContext, params: Params) -> dict:
        n = int(getattr(params, "n", 20000))
        t_end = time.monotonic() + float(getattr(params, "seconds", 1.0))
        i = 0
        while time.monotonic() < t_end:
            i = min(i + 1, n - 1)
            ctx.progress(done=i, total=n, unit="items")
        ctx.progress(done=n, total=n, unit="items", stage="final")
        return {"n": n}


class Writer(Handler):
    """Copies input 0 to output "copy.txt"."""

    name = "test.writer"
    Params = Params

    def run(self, ctx: JobContext, params: Params) -> dict:
        data = ctx.input_path(0).read_bytes()
        ctx.output_path("copy.txt").write_bytes(data)
        return {"bytes": len(data)}


class Odd(Handler):
    """Reports NaN progress and returns a result no protobuf string can carry."""

    name = "test.odd"
    Params = Params

    def run(self, ctx: JobContext, params: Params) -> dict:
        ctx.progress(fraction=float("nan"), message="nul\x00inside")
        return {"loss": float("nan"), "bad": "\ud800"}


# -- thread job types: run on a thread of the worker process ----------------


class ThreadProbe(Handler):
    """Reports where it ran: process, thread, how often setup ran on this instance."""

    name = "test.thread_probe"
    Params = Params
    isolation = "thread"
    setups = 0

    def setup(self, device: str) -> None:
        self.setups += 1

    def run(self, ctx: JobContext, params: Params) -> dict:
        if getattr(params, "touch_workdir", False):
            (ctx.workdir / "scratch").write_text("x")
        return {"pid": os.getpid(), "thread": threading.current_thread().name,
                "setups": self.setups, "device": ctx.device}  # fmt: skip


class ThreadSleep(Sleep):
    """`debug.sleep` on a thread (its `ignore_cancel` makes a thread that cannot be stopped)."""

    name = "test.thread_sleep"
    isolation = "thread"


class ThreadChatty(Chatty):
    """`test.chatty` on a thread (coalescing on the thread path)."""

    name = "test.thread_chatty"
    isolation = "thread"


class ThreadWriter(Writer):
    """`test.writer` on a thread (inputs, outputs and the lazy workdir there)."""

    name = "test.thread_writer"
    isolation = "thread"


# -- async job types: awaited on the worker's event loop ---------------------


class AsyncSleepParams(BaseModel):
    duration: float = 0.0
    steps: int = 1
    fail: bool = False
    ignore_cancel: bool = False
    result_of: str = ""


class AsyncSleep(Handler):
    """Sleeps with `await`, reporting progress; fails, honours or ignores a cancel as asked."""

    name = "test.async_sleep"
    Params = AsyncSleepParams
    isolation = "async"

    async def run(self, ctx: JobContext, params: AsyncSleepParams) -> dict:
        loop = asyncio.get_running_loop()
        for step in range(params.steps):
            if not params.ignore_cancel:
                ctx.check_cancelled()
            ctx.progress(done=step + 1, total=params.steps, unit="steps")
            await asyncio.sleep(params.duration / params.steps)
        if params.fail:
            raise PermanentError("failed as asked", code="ASYNC_FAIL")
        if params.result_of == "not-json":
            return {"loop": object()}
        return {"thread": threading.current_thread().name, "loop": type(loop).__name__}
