"""The code that runs inside a slot process.

A slot process imports the handlers, calls each one's `setup(device)` once,
reports "ready", then loops: receive a job over its pipe, run it with a
`SlotJobContext`, send back progress (coalesced) and one outcome. The parent
cancels through a shared `multiprocessing.Event` and, when a handler ignores
it, kills the whole process and starts a new one.

Messages child -> parent (tuples over the pipe):
    ("ready", {"types": [...], "failed": {type: error}, "device": {...}, "cuda_memory": …})
    ("progress", job_id, attempt, progress_dict)
    ("done", job_id, attempt, outcome_dict)   # outcome_dict["cuda_memory"] as in ready
`cuda_memory` (only on CUDA) is this process's allocator figures, for the
agent's metrics.
Messages parent -> child: ("run", job_dict) and ("stop",).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from worker._context import BaseJobContext
from worker.sdk import Cancelled, Handler, JobError

log = logging.getLogger("spool.worker.slot")

#: the fastest a slot forwards progress of one job to the agent
CHILD_PROGRESS_INTERVAL_S = 0.05
#: how often an orphaned slot notices its parent is gone
PARENT_WATCH_INTERVAL_S = 0.5


class _Link:
    """The child's end of the pipe: thread-safe sends; a dead parent ends the process."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            # The agent is gone: nobody can receive this job's result any more.
            os._exit(0)


class _ProgressForwarder:
    """Latest-wins forwarding of one job's progress, at most every CHILD_PROGRESS_INTERVAL_S."""

    def __init__(self, link: _Link, job_id: str, attempt: int) -> None:
        self._link = link
        self._key = (job_id, attempt)
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
                self._link.send(("progress", *self._key, progress))
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
            self._link.send(("progress", *self._key, self._pending))
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


class SlotJobContext(BaseJobContext):
    """The `JobContext` handlers get inside a slot process."""

    def __init__(self, *, forwarder: _ProgressForwarder, cancel_event: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self._forwarder = forwarder
        self._cancel_event = cancel_event

    def _emit_progress(self, progress: dict[str, Any]) -> None:
        self._forwarder.emit(progress)

    @property
    def cancelled(self) -> bool:
        """True once the agent set this slot's cancel flag (Cancel or timeout)."""
        return self._cancel_event.is_set()


def resolve_device(spec: str) -> dict[str, Any]:
    """Turn `auto|cpu|cuda|cuda:N` into a device description.

    torch is optional: without it (or without CUDA) `auto` means cpu.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return {"device": "cpu", "kind": "cpu", "index": 0, "name": "cpu", "memory_bytes": 0}
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except Exception:
        has_cuda = False
    if spec == "auto" and not has_cuda:
        return {"device": "cpu", "kind": "cpu", "index": 0, "name": "cpu", "memory_bytes": 0}
    if spec == "auto":
        spec = "cuda:0"
    if not spec.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not has_cuda:
        # An explicit GPU request on a machine without one is a config error: say so now.
        raise RuntimeError(f"SPOOL_DEVICE={spec} but torch reports no CUDA device")
    index = int(spec.partition(":")[2] or 0)
    props = torch.cuda.get_device_properties(index)
    name, memory = props.name, int(props.total_memory)
    return {
        "device": f"cuda:{index}",
        "kind": "cuda",
        "index": index,
        "name": name,
        "memory_bytes": memory,
    }


def cuda_memory(device: str, *, reset_peak: bool = False) -> dict[str, Any] | None:
    """This slot's CUDA allocator figures on `device` (None off CUDA or on error).

    Keys: device, allocated, reserved, peak (allocated, since the last reset).
    """
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        figures = {
            "device": device,
            "allocated": int(torch.cuda.memory_allocated(device)),
            "reserved": int(torch.cuda.memory_reserved(device)),
            "peak": int(torch.cuda.max_memory_allocated(device)),
        }
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return figures
    except Exception:
        log.debug("reading CUDA memory failed", exc_info=True)
        return None


def _import_fetch() -> Any:
    """`worker.fetch` when it is installed (it brings grpc), else None."""
    try:
        from worker import fetch
    except ImportError:
        return None
    return fetch


#: the slot's blob client, made on first use (only jobs with blobs need one)
_BLOB_CLIENT: list[Any] = []


def _blob_client(config: dict[str, Any], job_id: str, attempt: int) -> Any:
    """The slot's BlobService client acting for this attempt, or None without a server."""
    fetch = _import_fetch()
    conn = config.get("connection")
    if fetch is None or not conn or not conn.get("server"):
        return None
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
    fetch = _import_fetch()
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
    fetch = _import_fetch()
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


def _run_one(
    job: dict[str, Any],
    handlers: dict[str, Handler],
    device: str,
    config: dict[str, Any],
    link: _Link,
    cancel_event: Any,
) -> dict[str, Any]:
    """Run one job to an outcome dict; never raises."""
    from worker.testing import validate_params

    handler = handlers.get(job["type"])
    if handler is None:
        return {"status": "failed", "code": "UNKNOWN_JOB_TYPE", "retryable": False,
                "message": f"this worker has no handler for {job['type']!r}"}  # fmt: skip
    root = Path(config["workdir_root"])
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"job-{job['job_id'][:8]}-", dir=root))
    forwarder = _ProgressForwarder(link, job["job_id"], job["attempt"])
    holder: list = []
    ctx = SlotJobContext(
        forwarder=forwarder,
        cancel_event=cancel_event,
        job_id=job["job_id"],
        attempt=job["attempt"],
        job_type=job["type"],
        device=device,
        inputs=job.get("inputs", []),
        workdir=workdir,
        logger=logging.getLogger(f"spool.job.{job['type']}"),
        fetcher=_make_fetcher(config, job["job_id"], job["attempt"], holder),
        allowed_file_root=Path(config["file_root"]) if config.get("file_root") else None,
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
        shutil.rmtree(workdir, ignore_errors=True)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the agent dies, even while a handler ignores everything else."""
    while True:
        time.sleep(PARENT_WATCH_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def slot_main(conn: Any, cancel_event: Any, config: dict[str, Any]) -> None:
    """Entry point of a slot process (multiprocessing target)."""
    # The agent owns shutdown: a terminal Ctrl-C or a SIGTERM to the process
    # group must not kill jobs before the agent drains them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=config.get("log_level", "INFO"),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s slot{config.get('slot', '?')} %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_parent, args=(config["parent_pid"],), daemon=True).start()
    link = _Link(conn)

    from worker.handlers import load_handlers

    _import_fetch()  # pay for the grpc import now, not in the first job
    device_info = resolve_device(config.get("device", "auto"))
    device = device_info["device"]
    classes = load_handlers(config.get("handlers", ""), types=config.get("types"))
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
    ready = {"types": sorted(handlers), "failed": failed, "device": device_info}
    memory = cuda_memory(device, reset_peak=True)
    if memory is not None:
        ready["cuda_memory"] = memory
    link.send(("ready", ready))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "run":
            job = msg[1]
            outcome = _run_one(job, handlers, device, config, link, cancel_event)
            # The peak is per job: read it, then reset it for the next one.
            memory = cuda_memory(device, reset_peak=True)
            if memory is not None:
                outcome["cuda_memory"] = memory
            link.send(("done", job["job_id"], job["attempt"], outcome))
