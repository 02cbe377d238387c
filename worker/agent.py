"""The worker agent: the public `Agent`, wiring the stream, the attempts and the slots.

Three parts, each in its own module:
- `worker._stream.Stream`: the WorkerService.Connect stream (Hello/Welcome,
  reader, writer, heartbeat, reconnect, Batch packing, the durable outbox and
  its resend until Ack, credits). The only part that touches protobuf.
- `worker._attempts.Attempts`: the per-attempt state machine (waiting, running,
  finished until acknowledged; Cancel, timeouts, forced stop, drain), deciding
  each attempt's terminal outcome as a plain value.
- `worker._slots.SlotPool`: where handlers run (slot processes, or threads for
  light types), reporting `Progress` and one `Outcome` per attempt.

Handlers never run on the agent's loop, so the stream never stalls and a
handler that ignores a cancel can be stopped without taking the worker down.
The agent itself holds only what spans the parts: the drain, the credits'
capacity (free slots plus the prefetch allowance) and the stats and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker import metrics
from worker._attempts import Assignment, Attempt, Attempts, Failed, JobKey, Released, Terminal
from worker._config import WorkerIdentity, WorkerSettings, default_state_dir
from worker._outcome import KILLED, Outcome, Progress
from worker._slots import SlotCallbacks, SlotPool
from worker._stream import Session, Stream

log = logging.getLogger("spool.worker")

#: after a drain, how long to try to deliver the last results before exiting
FINAL_FLUSH_TIMEOUT_S = 5.0


class Agent:
    """A `spool-worker`: holds the stream and the slots, maps one onto the other."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        #: credits announced together while control still holds some (a quarter of
        #: what the worker can hold: 1 for a one-slot GPU worker without prefetch)
        self._credit_batch = max(1, (settings.slots + settings.prefetch) // 4)
        self._identity: WorkerIdentity | None = None
        self.worker_id = settings.worker_id
        workdir = settings.workdir or str(Path(settings.state_dir or default_state_dir()) / "work")
        child_config = {
            "handlers": settings.handlers,
            "types": settings.types or None,
            "device": settings.device,
            "workdir_root": workdir,
            "file_root": settings.file_root,
            "log_level": settings.log_level,
            "connection": settings.connection(),
        }
        self.pool = SlotPool(
            settings.slots,
            child_config,
            SlotCallbacks(
                on_idle=self._on_slot_idle, on_progress=self._on_progress, on_done=self._on_done
            ),
        )
        self.attempts = Attempts(self.pool, self, prefetch=settings.prefetch)
        self.stream = Stream(settings, self)
        self.job_types: list[str] = []
        self.device: dict[str, Any] = {}
        self._draining = False
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None
        self._drain_reason = ""
        #: counters, for logs and tests
        self.stats = {"sessions": 0, "assigned": 0, "released": 0, "completed": 0,
                      "failed": 0, "canceled": 0, "killed": 0}  # fmt: skip

    @property
    def jobs(self) -> dict[JobKey, Attempt]:
        """The attempts held: waiting, running, or finished and not acknowledged."""
        return self.attempts.table

    @property
    def _connected(self) -> bool:
        return self.stream.connected

    # -- supervisor -------------------------------------------------------------
    async def run(self) -> None:
        """Start the slots, then serve until drained (`drain()`, Drain, SIGTERM)."""
        if not self.worker_id:
            self._identity = WorkerIdentity(Path(self.settings.state_dir or default_state_dir()))
            self.worker_id = self._identity.acquire()
        metrics_port = 0
        try:
            try:
                if metrics.serve(self.settings.metrics_port, self.settings.metrics_addr):
                    metrics_port = self.settings.metrics_port
            except OSError as exc:
                raise RuntimeError(
                    f"cannot serve metrics on {self.settings.metrics_addr}:"
                    f"{self.settings.metrics_port}: {exc}"
                ) from exc
            metrics.SLOTS.set(self.settings.slots)
            metrics.RUNNING_JOBS.set(0)
            metrics.set_connected(False)
            # Slots name this worker in BlobService calls made for its attempts.
            self.pool.configure(worker_id=self.worker_id)
            ready = await self.pool.start()
            self.job_types = list(ready["types"])
            self.device = ready["device"]
            if ready["failed"]:
                log.warning("job types whose setup failed: %s", ready["failed"])
            missing = sorted(set(self.settings.types) - set(self.job_types))
            if missing:
                log.warning("job types asked for but not available: %s", ", ".join(missing))
            if not self.job_types:
                raise RuntimeError("no job type is available on this worker")
            log.info("worker %s (%s): %d slot(s), device %s, types %s", self.worker_id,
                     self.settings.name, self.settings.slots, self.device["device"],
                     ", ".join(self.job_types))  # fmt: skip
            self.stream.worker_id = self.worker_id
            self.stream.job_types = self.job_types
            self.stream.device = self.device
            connect = asyncio.create_task(self.stream.run(), name="connect-loop")
            try:
                await self._stopped.wait()
            finally:
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connect
        finally:
            self.attempts.close()
            await self.pool.stop()
            metrics.shutdown(metrics_port)
            if self._identity is not None:
                self._identity.release()

    def request_drain(self, reason: str) -> None:
        """Begin a drain (idempotent; safe from a signal handler on the loop)."""
        if self._drain_task is not None and reason == self._drain_reason:
            # The same signal twice (Ctrl-C, Ctrl-C): the operator wants out now;
            # the running jobs' leases will expire on the control plane.
            log.warning("%s again during drain: stopping now", reason)
            self._stopped.set()
            return
        if self._drain_task is None:
            self._drain_reason = reason
            self._drain_task = asyncio.get_running_loop().create_task(
                self.drain(reason), name="drain"
            )

    async def drain(self, reason: str) -> None:
        """Stop taking jobs, give running ones the drain grace, release the rest, stop."""
        if self._draining:
            return
        self._draining = True
        # Prefetched jobs never started: hand them back now for others to run.
        self.attempts.release_waiting()
        log.info("draining (%s): %d job(s) running", reason, self.attempts.unfinished)
        stream = self.stream
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self.attempts.unfinished and time.monotonic() < deadline:
            await stream.wait_changed(deadline - time.monotonic())
        self.pool.stop_restarting()
        self.attempts.release_running()
        deadline = time.monotonic() + FINAL_FLUSH_TIMEOUT_S
        while stream.undelivered() and time.monotonic() < deadline:
            await stream.wait_changed(deadline - time.monotonic())
        if stream.undelivered():
            log.warning("exiting with %d unacknowledged result(s)", stream.undelivered())
        elif stream.connected:
            # End the stream by half-closing it and waiting for control to close its
            # side: control then has read and applied every message. Cancelling the
            # call instead could drop the last ones (a Released still in flight).
            stream.half_close()
            while stream.connected and time.monotonic() < deadline:
                await stream.wait_changed(deadline - time.monotonic())
        self._stopped.set()

    def _top_up_credits(self) -> None:
        """Offer the free slots plus the prefetch allowance not taken by waiting jobs."""
        if self._draining:
            return
        self.stream.offer(
            self.pool.idle_count() + self.settings.prefetch - len(self.attempts.waiting),
            min_batch=self._credit_batch,
        )

    # -- stream → agent (worker._stream.StreamEvents) ---------------------------
    def held(self) -> Iterable[JobKey]:
        return self.attempts.table

    def on_welcome(self, session: Session) -> None:
        self.stats["sessions"] += 1
        log.info("connected to %s (replica %s, lease %.1fs, heartbeat %.1fs, %d job(s) held)",
                 self.settings.server, session.replica or "?", session.lease_s,
                 session.heartbeat_interval_s, len(self.jobs))  # fmt: skip
        self.attempts.resume_progress()
        self._top_up_credits()

    def on_disconnect(self) -> None:
        log.info("disconnected; %d job(s) held", len(self.jobs))

    def on_assign(self, a: Assignment) -> None:
        self.stats["assigned"] += 1
        reason = self.attempts.assign(a, draining=self._draining, served=self.job_types)
        if reason is None:
            metrics.RUNNING_JOBS.set(self.attempts.unfinished)
            return
        log.warning("releasing job %s attempt %d: %s", a.key[0], a.key[1], reason)
        self.stats["released"] += 1
        self.stream.send_outcome(a.key, Released(reason), None)

    def on_cancel(self, key: JobKey, grace_s: float, reason: str) -> None:
        self.attempts.cancel(key, grace_s, reason)

    def on_drain(self, reason: str) -> None:
        self.request_drain(f"control asked: {reason or 'drain'}")

    def on_acked(self, key: JobKey, applied: bool, reason: str) -> None:
        if not applied:
            log.info("control refused the outcome of job %s attempt %d: %s",
                     key[0], key[1], reason or "no reason given")  # fmt: skip
        self.attempts.acked(key)

    # -- attempts → agent (worker._attempts.AttemptEvents) ----------------------
    def progress_open(self) -> bool:
        return self.stream.connected

    def send_progress(self, key: JobKey, progress: Progress) -> None:
        self.stream.send_progress(key, progress)

    def finished(
        self, attempt: Attempt, terminal: Terminal, last: Progress | None, outcome: Outcome
    ) -> None:
        key = attempt.key
        terminal = self.stream.send_outcome(key, terminal, last)
        kind = terminal.kind
        self.stats[kind] = self.stats.get(kind, 0) + 1
        if outcome.status == KILLED:
            self.stats["killed"] += 1
        duration_s = time.monotonic() - attempt.started
        metrics.job_finished(key, attempt.job_type, kind, duration_s)
        metrics.RUNNING_JOBS.set(self.attempts.unfinished)
        # One line per job at INFO would cost more than a no-op job: only the
        # ones that did not succeed are logged at INFO.
        log.log(logging.DEBUG if kind == "completed" else logging.INFO,
                "job %s attempt %d %s in %.2fs", key[0], key[1],
                kind if not isinstance(terminal, Failed) else f"failed ({terminal.code})",
                duration_s)  # fmt: skip

    def capacity_changed(self) -> None:
        self._top_up_credits()

    # -- slots → agent ----------------------------------------------------------
    def _on_slot_idle(self) -> None:
        """A slot became free: its CUDA figures changed, and it can take a job."""
        metrics.set_gpu_memory(self.pool.cuda_memory())
        self.attempts.start_waiting()
        self._top_up_credits()

    def _on_progress(self, key: JobKey, progress: Progress) -> None:
        run = self.attempts.on_progress(key, progress)
        if run is not None:
            metrics.job_progress(key, run.job_type, progress, time.monotonic() - run.started)

    def _on_done(self, key: JobKey, outcome: Outcome) -> None:
        self.attempts.on_outcome(key, outcome)
