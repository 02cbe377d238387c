"""Running one attempt of a job: the code shared by slot processes and thread jobs.

A job runs either in a slot subprocess (`worker._slot_child`, the default) or
on a thread of the worker process (`Handler.isolation = "thread"`, see
`worker._slots`). Both call `run_attempt`, so params validation, the context,
output upload and the `Outcome` are the same wherever the job lands; only
where progress goes (`send_progress`) and where the cancel flag lives differ.

`run_attempt` returns an `Outcome` (worker._outcome) with status completed,
failed or cancelled; the pool adds killed and crashed. Progress leaves through
one `Coalescer` per attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker._context import BaseJobContext
from worker._outcome import Coalescer, Outcome, Progress
from worker.sdk import Cancelled, Handler, JobError

log = logging.getLogger("spool.worker.slot")

#: the fastest one job's progress is forwarded out of the runner (to the pipe or the loop)
CHILD_PROGRESS_INTERVAL_S = 0.05

#: where a runner sends one job's coalesced progress
ProgressSink = Callable[[Progress], None]


class AttemptContext(BaseJobContext):
    """The `JobContext` handlers get in a slot process or on a worker thread."""

    def __init__(self, *, coalescer: Coalescer[Progress], cancel_flag: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self._coalescer = coalescer
        self._cancel_flag = cancel_flag

    def _emit_progress(self, progress: Progress) -> None:
        self._coalescer.emit(progress)

    @property
    def cancelled(self) -> bool:
        """True once the agent set this job's cancel flag (Cancel or timeout)."""
        return self._cancel_flag.is_set()


def setup_handlers(
    classes: dict[str, type[Handler]], device: str
) -> tuple[dict[str, Handler], dict[str, str]]:
    """Instantiate each class and call `setup(device)`; (ready handlers, failed: type -> error)."""
    handlers: dict[str, Handler] = {}
    failed: dict[str, str] = {}
    for name, cls in classes.items():
        try:
            inst = cls()
            inst.setup(device)
            handlers[name] = inst
        except Exception as exc:
            log.error("setup of %s failed:\n%s", name, traceback.format_exc())
            failed[name] = f"{type(exc).__name__}: {exc}"
    return handlers, failed


def import_fetch() -> Any:
    """`worker.fetch` when it is installed (it brings grpc), else None."""
    try:
        from worker import fetch
    except ImportError:
        return None
    return fetch


#: this process's blob client, made on first use (only jobs with blobs need one)
_BLOB_CLIENT: list[Any] = []
_BLOB_CLIENT_LOCK = threading.Lock()


def _blob_client(config: dict[str, Any], job_id: str, attempt: int) -> Any:
    """This process's BlobService client acting for this attempt, or None without a server."""
    fetch = import_fetch()
    conn = config.get("connection")
    if fetch is None or not conn or not conn.get("server"):
        return None
    with _BLOB_CLIENT_LOCK:  # thread jobs share one client
        if not _BLOB_CLIENT:
            from worker._config import channel_credentials

            _BLOB_CLIENT.append(
                fetch.BlobClient.connect(
                    conn["server"],
                    token=conn.get("token") or None,
                    worker_id=config.get("worker_id") or None,
                    credentials=channel_credentials(conn),
                )
            )
    return _BLOB_CLIENT[0].for_job(job_id, attempt)


def _make_fetcher(config: dict[str, Any], job_id: str, attempt: int, ctx_holder: list) -> Any:
    """An input fetcher backed by `worker.fetch.fetch_input`, or None (local files only)."""
    fetch = import_fetch()
    if fetch is None:
        return None
    root = config.get("file_root")

    def fetcher(uri: str, dest: Path, is_cancelled: Any) -> Path:
        return fetch.fetch_input(
            uri,
            dest,
            blob_client=_blob_client(config, job_id, attempt),
            allowed_file_root=Path(root) if root else None,
            on_progress=ctx_holder[0].progress if ctx_holder else None,
            is_cancelled=is_cancelled,
        )

    return fetcher


def _upload_outputs(config: dict[str, Any], job: dict[str, Any], outputs: dict[str, Path]) -> list:
    """Upload outputs to BlobService; without one, keep them on disk as file:// URIs."""
    if not outputs:
        return []
    fetch = import_fetch()
    client = _blob_client(config, job["job_id"], job["attempt"])
    if fetch is None or client is None:
        keep = Path(config["workdir_root"]) / "outputs" / job["job_id"]
        keep.mkdir(parents=True, exist_ok=True)
        uris = []
        for name, path in outputs.items():
            dest = keep / name
            shutil.move(str(path), dest)
            uris.append(dest.resolve().as_uri())
        return uris
    return [
        fetch.upload_output(p, blob_client=client, tenant=job.get("tenant"))
        for p in outputs.values()
    ]


def _prepare(
    job: dict[str, Any],
    handlers: dict[str, Handler],
    device: str,
    config: dict[str, Any],
    send_progress: ProgressSink,
    cancel_flag: Any,
) -> tuple[Handler, AttemptContext, Coalescer[Progress]] | Outcome:
    """The handler, context and coalescer of one attempt (or the Outcome: no handler)."""
    handler = handlers.get(job["type"])
    if handler is None:
        return Outcome.failed("UNKNOWN_JOB_TYPE", f"this worker has no handler for {job['type']!r}",
                              retryable=False)  # fmt: skip
    coalescer = Coalescer(send_progress, CHILD_PROGRESS_INTERVAL_S, threadsafe=True)
    holder: list = []
    ctx = AttemptContext(
        coalescer=coalescer,
        cancel_flag=cancel_flag,
        job_id=job["job_id"],
        attempt=job["attempt"],
        job_type=job["type"],
        device=device,
        inputs=job.get("inputs", []),
        workdir_root=config["workdir_root"],
        logger=logging.getLogger(f"spool.job.{job['type']}"),
        fetcher=_make_fetcher(config, job["job_id"], job["attempt"], holder),
        allowed_file_root=config.get("file_root") or None,
    )
    holder.append(ctx)
    return handler, ctx, coalescer


def _result(out: Any) -> dict[str, Any] | Outcome:
    """What `run` returned as the JSON result (or the INVALID_RESULT Outcome)."""
    try:
        result = json.loads(json.dumps(out if out is not None else {}))
    except (TypeError, ValueError) as exc:
        return Outcome.failed("INVALID_RESULT", f"result is not JSON: {exc}", retryable=False)
    if not isinstance(result, dict):
        return Outcome.failed("INVALID_RESULT", f"result must be a dict, got "
                              f"{type(out).__name__}", retryable=False)  # fmt: skip
    return result


def _failure(exc: Exception, job: dict[str, Any]) -> Outcome:
    """The Outcome of an attempt whose handler raised `exc`."""
    if isinstance(exc, Cancelled):
        return Outcome.cancelled()
    if isinstance(exc, JobError):
        return Outcome.failed(exc.code, exc.message[:2000], retryable=bool(exc.retryable),
                              retry_delay_s=exc.retry_delay_s)  # fmt: skip
    log.error("job %s attempt %s (%s) failed:\n%s", job["job_id"], job["attempt"],
              job["type"], traceback.format_exc())  # fmt: skip
    return Outcome.failed("HANDLER_ERROR", f"{type(exc).__name__}: {exc}"[:2000])


def run_attempt(
    job: dict[str, Any],
    handlers: dict[str, Handler],
    device: str,
    config: dict[str, Any],
    send_progress: ProgressSink,
    cancel_flag: Any,
) -> Outcome:
    """Run one job to its `Outcome`; never raises an `Exception`.

    `send_progress` gets the coalesced progress dicts (the final one before
    this returns); `cancel_flag` is anything with `is_set()` (a
    `multiprocessing.Event` across the pipe, a `threading.Event` on a thread).
    The work directory exists only if the handler asked for it, and is
    removed before this returns.
    """
    from worker.testing import validate_params

    prepared = _prepare(job, handlers, device, config, send_progress, cancel_flag)
    if isinstance(prepared, Outcome):
        return prepared
    handler, ctx, coalescer = prepared
    try:
        out = handler.run(ctx, validate_params(handler, job.get("params")))
        coalescer.close()
        result = _result(out)
        if isinstance(result, Outcome):
            return result
        return Outcome.completed(result, _upload_outputs(config, job, ctx.outputs()))
    except Exception as exc:
        return _failure(exc, job)
    finally:
        coalescer.close()
        ctx.remove_workdir()


async def run_attempt_async(
    job: dict[str, Any],
    handlers: dict[str, Handler],
    device: str,
    config: dict[str, Any],
    send_progress: ProgressSink,
    cancel_flag: Any,
) -> Outcome:
    """`run_attempt` for an `isolation = "async"` handler, on the worker's event loop.

    Awaits the handler's `async def run`; outputs are uploaded on a thread (that
    is blocking I/O). A forced stop cancels this task: the CancelledError goes up.
    """
    from worker.testing import validate_params

    prepared = _prepare(job, handlers, device, config, send_progress, cancel_flag)
    if isinstance(prepared, Outcome):
        return prepared
    handler, ctx, coalescer = prepared
    try:
        out = await handler.run(ctx, validate_params(handler, job.get("params")))  # type: ignore[misc]
        coalescer.close()
        result = _result(out)
        if isinstance(result, Outcome):
            return result
        outputs = ctx.outputs()
        uris = await asyncio.to_thread(_upload_outputs, config, job, outputs) if outputs else []
        return Outcome.completed(result, uris)
    except Exception as exc:
        return _failure(exc, job)
    finally:
        coalescer.close()
        ctx.remove_workdir()
