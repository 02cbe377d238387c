"""The public handler API: everything a job type needs, nothing it doesn't.

A job type is one module with a `Handler` subclass::

    from pydantic import BaseModel
    from worker.sdk import Handler, JobContext, PermanentError

    class Params(BaseModel):
        seconds: float = 1.0

    class Sleep(Handler):
        name = "debug.sleep"
        Params = Params

        def setup(self, device: str) -> None:
            ...  # load models once per worker process

        def run(self, ctx: JobContext, params: Params) -> dict:
            for i in range(10):
                ctx.check_cancelled()
                ctx.progress(done=i + 1, total=10, unit="steps")
            return {"ok": True}

A light job type may set `isolation = "thread"` to run on a thread of the
worker process instead of a slot subprocess, or `isolation = "async"` with an
`async def run` to run on the worker's event loop (see `Handler.isolation` for
what each trades away).

The runtime behind `JobContext` lives in private modules (`worker._context`,
`worker._attempt`, `worker._slots`, `worker._slot_child`) and in
`worker.testing` (the harness); handlers import only this module.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel


class JobError(Exception):
    """A handler failure that carries its own retry decision."""

    code: str = "HANDLER_ERROR"
    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_delay_s = retry_delay_s


class RetryableError(JobError):
    """The attempt failed but another one may succeed (e.g. a network blip)."""

    retryable = True


class PermanentError(JobError):
    """No attempt will ever succeed (e.g. a corrupt input): fail the job now."""

    code = "PERMANENT_ERROR"
    retryable = False


class Cancelled(Exception):
    """Raised by `JobContext.check_cancelled()` once a cancel has reached the job."""


class JobContext(abc.ABC):
    """What a running handler can see and do. Every call is cheap and thread-safe."""

    job_id: str
    attempt: int
    job_type: str
    #: torch device string: "cpu", "cuda" or "cuda:N"
    device: str
    #: input URIs as submitted (blob:sha256:…, https://…, file://…)
    inputs: list[str]
    #: a private scratch directory, created on first use and removed after the
    #: attempt (a handler that never reads it costs no mkdir/rmtree)
    workdir: Path
    logger: logging.Logger

    @abc.abstractmethod
    def progress(
        self,
        fraction: float | None = None,
        *,
        done: int | None = None,
        total: int | None = None,
        unit: str = "",
        stage: str = "",
        message: str = "",
    ) -> None:
        """Report progress; coalesced (the latest value wins, the final one is always sent).

        Give either `fraction` (0..1) or `done`/`total`; rate and ETA are derived.
        """

    @property
    @abc.abstractmethod
    def cancelled(self) -> bool:
        """True once the job was cancelled (or timed out); stop soon after."""

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the job was cancelled."""
        if self.cancelled:
            raise Cancelled(self.job_id)

    @abc.abstractmethod
    def input_path(self, index: int = 0) -> Path:
        """Fetch input `index` (blob, URL or allowed file) and return a local path."""

    @abc.abstractmethod
    def output_path(self, name: str) -> Path:
        """A path to write output `name` to; it is uploaded and recorded on the job."""


class Handler(abc.ABC):
    """Base class of a job type."""

    #: the job type this handler serves, e.g. "video.transcode"
    name: ClassVar[str]
    #: pydantic model validating the job's params
    Params: ClassVar[type[BaseModel]]
    #: attempts allowed when the job does not say (JobSpec.max_attempts = 0)
    max_attempts: ClassVar[int] = 3
    #: where `run` executes. "process" (the default): in a slot subprocess, so a
    #: handler that ignores a cancel is killed with its process and the slot
    #: restarted; use it for anything heavy, GPU work, native code that may
    #: crash. "thread": on a thread of the worker process itself: no process
    #: hop, no pickling, `setup` once in the worker process; but a cancel is
    #: only cooperative (`ctx.cancelled`): a forced stop reports the attempt
    #: killed at once and abandons the thread, which runs on until `run`
    #: returns (its outcome discarded), and a crash takes the worker down.
    #: For light, well-behaved job types only. "async": `run` is an `async def`,
    #: awaited on the worker's event loop itself (no thread, no process): for
    #: I/O-bound and tiny jobs written with asyncio. A forced stop cancels it
    #: (CancelledError at its next await); anything blocking in it (CPU work,
    #: `ctx.input`, which downloads: use `await asyncio.to_thread(...)`) stalls
    #: the worker's stream meanwhile.
    isolation: ClassVar[str] = "process"

    def setup(self, device: str) -> None:  # noqa: B027 - optional hook
        """Load models and other heavy resources once per worker process."""

    @abc.abstractmethod
    def run(self, ctx: JobContext, params: Any) -> dict[str, Any] | None:
        """Do the work; return a JSON-able result dict (or None)."""
