"""The code that runs inside a slot process.

A slot process imports the handlers, calls each one's `setup(device)` once,
reports "ready", then loops: receive a job over its pipe, run it with
`worker._attempt.run_attempt` (the same code thread jobs run), send back
progress (coalesced) and one outcome. Job types the parent runs on threads
(`config["thread_types"]`) are not set up here. The parent
cancels through a shared `multiprocessing.Event` and, when a handler ignores
it, kills the whole process and starts a new one.

Messages child -> parent (tuples over the pipe):
    ("ready", {"types": [...], "failed": {type: error}, "device": {...}, "cuda_memory": …})
    ("progress", job_id, attempt, Progress)
    ("done", job_id, attempt, Outcome)   # Outcome.cuda_memory as in ready
(`Progress` and `Outcome` from `worker._outcome`.)
`cuda_memory` (only on CUDA) is this process's allocator figures, for the
agent's metrics.
Messages parent -> child: ("run", job_dict) and ("stop",).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from worker._attempt import (
    CHILD_PROGRESS_INTERVAL_S,  # noqa: F401 - re-exported: the coalescing interval
    import_fetch,
    run_attempt,
    setup_handlers,
)
from worker._outcome import Progress

log = logging.getLogger("spool.worker.slot")

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

    import_fetch()  # pay for the grpc import now, not in the first job
    device_info = resolve_device(config.get("device", "auto"))
    device = device_info["device"]
    classes = load_handlers(config.get("handlers", ""), types=config.get("types"))
    # The parent runs these on its own threads and set them up itself.
    skip = set(config.get("thread_types") or ())
    classes = {name: cls for name, cls in classes.items() if name not in skip}
    handlers, failed = setup_handlers(classes, device)
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
            key = (job["job_id"], job["attempt"])

            def send_progress(progress: Progress, key: tuple = key) -> None:
                link.send(("progress", *key, progress))

            outcome = run_attempt(job, handlers, device, config, send_progress, cancel_event)
            # The peak is per job: read it, then reset it for the next one.
            memory = cuda_memory(device, reset_peak=True)
            if memory is not None:
                outcome.cuda_memory = memory
            link.send(("done", *key, outcome))
