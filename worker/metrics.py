"""Prometheus metrics of a worker, served on `/metrics` (`--metrics-port`, 0 = off).

Handlers run in slot processes; every figure here is recorded in the agent
(the parent) from what the slots already report: a job starting, its progress,
its outcome, and the CUDA allocator figures a slot on a GPU attaches to its
ready report and to each outcome (`worker._slot_child.cuda_memory`). The agent
itself never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# The endpoint, shared with the control plane: metrics.serve(port) / metrics.shutdown(port).
from spool.metrics_http import serve as serve
from spool.metrics_http import shutdown as shutdown

RUNNING_JOBS = Gauge("spool_worker_running_jobs", "Jobs running in this worker's slots.")
SLOTS = Gauge("spool_worker_slots", "Slots of this worker (jobs it runs at once).")
CONNECTED = Gauge("spool_worker_connected", "1 while the stream to the control plane is up.")
JOBS = Counter(
    "spool_worker_jobs_total",
    "Attempts that ended on this worker, by the outcome it reported.",
    ["type", "outcome"],
)
HANDLER_DURATION = Histogram(
    "spool_worker_handler_duration_seconds",
    "Time from an Assign to the attempt's outcome on this worker.",
    ["type"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
FRAMES_PER_SECOND = Gauge(
    "spool_worker_frames_per_second",
    "Frames per second of the running jobs that report progress in frames (sum per type).",
    ["type"],
)
GPU_MEMORY = Gauge(
    "spool_worker_gpu_memory_bytes",
    "CUDA memory of the slot processes (sum over slots): allocated, reserved by the "
    "caching allocator, and the peak allocated during each slot's last job.",
    ["device", "kind"],
)
#: the `kind` values of spool_worker_gpu_memory_bytes
GPU_MEMORY_KINDS = ("allocated", "reserved", "peak")
#: the progress unit whose rate feeds spool_worker_frames_per_second
FRAMES_UNIT = "frames"

#: frames/s of each running job reporting frames: key → (type, rate)
_frame_rates: dict[Any, tuple[str, float]] = {}


def set_connected(connected: bool) -> None:
    """The stream to the control plane came up (True) or went down (False)."""
    CONNECTED.set(1 if connected else 0)


def job_progress(key: Any, job_type: str, progress: Mapping[str, Any], elapsed_s: float) -> None:
    """A running job's progress: feeds frames/s when its unit is frames."""
    if progress.get("unit") != FRAMES_UNIT:
        return
    rate = float(progress.get("rate") or 0.0)
    if rate <= 0.0 and elapsed_s > 0:
        rate = float(progress.get("done") or 0) / elapsed_s
    _frame_rates[key] = (job_type, rate)
    _update_frame_rate(job_type)


def job_finished(key: Any, job_type: str, outcome: str, duration_s: float) -> None:
    """An attempt ended here with `outcome` (completed, failed, canceled or released)."""
    JOBS.labels(type=job_type, outcome=outcome).inc()
    HANDLER_DURATION.labels(type=job_type).observe(max(0.0, duration_s))
    if _frame_rates.pop(key, None) is not None:
        _update_frame_rate(job_type)


def _update_frame_rate(job_type: str) -> None:
    FRAMES_PER_SECOND.labels(type=job_type).set(
        sum(rate for t, rate in _frame_rates.values() if t == job_type)
    )


def set_gpu_memory(readings: Iterable[Mapping[str, Any] | None]) -> None:
    """Sum the slots' latest CUDA figures per device (None: a slot off CUDA)."""
    totals: dict[str, dict[str, int]] = {}
    for reading in readings:
        if not reading:
            continue
        per_kind = totals.setdefault(reading["device"], dict.fromkeys(GPU_MEMORY_KINDS, 0))
        for kind in GPU_MEMORY_KINDS:
            per_kind[kind] += int(reading.get(kind) or 0)
    for device, per_kind in totals.items():
        for kind, value in per_kind.items():
            GPU_MEMORY.labels(device=device, kind=kind).set(value)
