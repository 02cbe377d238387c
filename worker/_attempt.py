"""Running one attempt of a job: the code shared by slot processes and thread jobs.

A job runs either in a slot subprocess (`worker._slot_child`, the default) or
on a thread of the worker process (`Handler.isolation = "thread"`, see
`worker._slots`). Both call `run_attempt`, so params validation, the context,
output upload and the outcome dict are the same wherever the job lands; only
where progress goes (`send_progress`) and where the cancel flag lives differ.

Outcome dicts (what `SlotCallbacks.on_done` receives):
    {"status": "completed", "result": {...}, "outputs": [uri, ...]}
    {"status": "failed", "code", "message", "retryable", "retry_delay_s"?}
    {"status": "cancelled"}
and, from the pool rather than from here, "killed" and "crashed".
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker._context import BaseJobContext
from worker.sdk import Cancelled, Handler, JobError

log = logging.getLogger("spool.worker.slot")

#: the fastest one job's progress is forwarded out of the runner (to the pipe or the loop)
CHILD_PROGRESS_INTERVAL_S = 0.05

#: where a runner sends one job's coalesced progress dicts
ProgressSink = Callable[[dict[str, Any]], None]


class ProgressForwarder:
    """Latest-wins forwarding of one job's progress, at most every CHILD_PROGRESS_INTERVAL_S."""

    def __init__(self, send: ProgressSink) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._last_sent = 0.0
        self._closed = False
        self._timer: threading.Timer | None = None

    def emit(self, progress: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            wait = self._last_sent + CHILD_PROGRESS_INTERVAL_S - time.monotonic()
            if wait <= 0 and self._timer is None:
                self._pending = None
                self._last_sent = time.monotonic()
                self._send(progress)
                return
            self._pending = progress
            if self._timer is None:
                self._timer = threading.Timer(max(wait, 0.0), self._flush_timer)
                self._timer.daemon = True
                self._timer.start()

    def _flush_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._send_pending()

    def _send_pending(self) -> None:
        if self._pending is not None and not self._closed:
            self._send(self._pending)
            self._pending = None
            self._last_sent = time.monotonic()

    def close(self) -> None:
        """Send what is pending (the final value) and stop forwarding."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._send_pending()
            self._closed = True


class AttemptContext(BaseJobContext):
    """The `JobContext` handlers get in a slot process or on a worker thread."""

    def __init__(self, *, forwarder: ProgressForwarder, cancel_flag: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self._forwarder = forwarder
        self._cancel_flag = cancel_flag

    def _emit_progress(self, progress: dict[str, Any]) -> None:
        self._forwarder.emit(progress)

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


def run_attempt(
    job: dict[str, Any],
    handlers: dict[str, Handler],
    device: str,
    config: dict[str, Any],
    send_progress: ProgressSink,
    cancel_flag: Any,
) -> dict[str, Any]:
    """Run one job to an outcome dict; never raises an `Exception`.

    `send_progress` gets the coalesced progress dicts (the final one before
    this returns); `cancel_flag` is anything with `is_set()` (a
    `multiprocessing.Event` across the pipe, a `threading.Event` on a thread).
    The work directory exists only if the handler asked for it, and is
    removed before this returns.
    """
    from worker.testing import validate_params

    handler = handlers.get(job["type"])
    if handler is None:
        return {"status": "failed", "code": "UNKNOWN_JOB_TYPE", "retryable": False,
                "message": f"this worker has no handler for {job['type']!r}"}  # fmt: skip
    forwarder = ProgressForwarder(send_progress)
    holder: list = []
    ctx = AttemptContext(
        forwarder=forwarder,
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
    try:
        params = validate_params(handler, job.get("params"))
        out = handler.run(ctx, params)
        forwarder.close()
        try:
            result = json.loads(json.dumps(out if out is not None else {}))
        except (TypeError, ValueError) as exc:
            return {"status": "failed", "code": "INVALID_RESULT", "retryable": False,
                    "message": f"result is not JSON: {exc}"}  # fmt: skip
        if not isinstance(result, dict):
            return {"status": "failed", "code": "INVALID_RESULT", "retryable": False,
                    "message": f"result must be a dict, got {type(out).__name__}"}  # fmt: skip
        outputs = _upload_outputs(config, job, ctx.outputs())
        return {"status": "completed", "result": result, "outputs": outputs}
    except Cancelled:
        return {"status": "cancelled"}
    except JobError as exc:
        return {
            "status": "failed",
            "code": exc.code,
            "message": exc.message[:2000],
            "retryable": bool(exc.retryable),
            "retry_delay_s": exc.retry_delay_s,
        }
    except Exception as exc:
        log.error("job %s attempt %s (%s) failed:\n%s", job["job_id"], job["attempt"],
                  job["type"], traceback.format_exc())  # fmt: skip
        return {"status": "failed", "code": "HANDLER_ERROR", "retryable": True,
                "message": f"{type(exc).__name__}: {exc}"[:2000]}  # fmt: skip
    finally:
        forwarder.close()
        ctx.remove_workdir()
