"""The worker agent: one WorkerService.Connect stream, slots that run the jobs.

Named tasks under one supervisor (`Agent.run`): the connect loop (reconnects
with exponential backoff and jitter, forever), and per stream a reader, a
writer and a heartbeat. Handlers never run here: they run in slot processes
(`worker._slots`), so the stream never stalls and a handler that ignores a
cancel can be killed without taking the worker down.

Stream rules (protos/spool/v1/worker_service.proto):
- Hello first (with the attempts still running from before a reconnect), then
  Welcome from control; credits are incremental: after Welcome, Ready(free
  slots), then Ready(n) whenever slots free up; never more credits than idle slots.
- Results (Completed/Failed/Canceled/Released, each preceded by the job's last
  progress) survive a reconnect and are sent once the stream is back; progress
  and heartbeats are per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from spool import batching
from spool.v1 import job_pb2, worker_service_pb2, worker_service_pb2_grpc
from worker import metrics
from worker._config import (
    WorkerIdentity,
    WorkerSettings,
    channel_credentials,
    channel_options,
    default_state_dir,
)
from worker._slots import JobKey, SlotCallbacks, SlotPool

log = logging.getLogger("spool.worker")

Req = worker_service_pb2.ConnectRequest

#: the most progress updates per second per job on the stream (the last one always goes)
PROGRESS_INTERVAL_S = 0.2
#: used when Welcome gives no heartbeat interval
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
#: used when a Cancel gives no grace period
DEFAULT_CANCEL_GRACE_S = 10.0
#: the worker cancels a job this long after its own timeout if control has not
#: (control enforces timeouts; this is the backstop)
LOCAL_TIMEOUT_MARGIN_S = 2.0
#: reconnect backoff: base * 2**n with full jitter, capped
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 10.0
#: how long to wait for Welcome after Hello
WELCOME_TIMEOUT_S = 10.0
#: after a drain, how long to try to deliver the last results before exiting
FINAL_FLUSH_TIMEOUT_S = 5.0


def _version() -> str:
    try:
        return metadata.version("spool")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class JobRun:
    """A job this worker holds: running, or finished with its result not yet sent."""

    key: JobKey
    job_type: str
    started: float
    cancel_requested: bool = False
    timed_out: bool = False
    releasing: bool = False
    finished: bool = False
    #: prefetched: waiting here for a free slot (the job to start, as the slot takes it)
    waiting_spec: dict[str, Any] | None = None
    latest_progress: dict[str, Any] | None = None
    progress_sent_at: float = 0.0
    flush_handle: asyncio.TimerHandle | None = None
    kill_handle: asyncio.TimerHandle | None = None
    timeout_handle: asyncio.TimerHandle | None = None

    def cancel_timers(self) -> None:
        """Drop every pending callback of this run."""
        for h in (self.flush_handle, self.kill_handle, self.timeout_handle):
            if h is not None:
                h.cancel()
        self.flush_handle = self.kill_handle = self.timeout_handle = None


@dataclass
class _Out:
    """Queued stream messages (written in order). Durable ones survive a reconnect."""

    msgs: tuple[Req, ...]
    durable: bool
    #: set on an attempt's outcome: once written it waits for control's Ack, and
    #: is resent after a reconnect until then
    done_key: JobKey | None = None


def _ref(key: JobKey) -> worker_service_pb2.AttemptRef:
    return worker_service_pb2.AttemptRef(job_id=key[0], attempt=key[1])


#: the int64 range of Progress.done / total
_INT64_MAX = 2**63 - 1
#: an ETA beyond this (a year) is no estimate: it is left out
_MAX_ETA_S = 366 * 24 * 3600.0


def _text(value: Any) -> str:
    """Text a protobuf string field accepts (valid UTF-8), whatever a handler passed."""
    return str(value or "").encode("utf-8", "replace").decode("utf-8")


def _finite(value: Any, lo: float, hi: float) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) and lo <= x <= hi else None


def progress_to_proto(p: dict[str, Any]) -> job_pb2.Progress:
    """A progress dict (worker._context.build_progress) as a `Progress` message.

    Values a message cannot carry (NaN, ±Infinity, out-of-range numbers or
    times, text that is not UTF-8) are replaced, so odd progress never
    stops the stream: control stores what it can.
    """

    def count(key: str) -> int:
        x = _finite(p.get(key, 0), 0, _INT64_MAX)
        return int(x) if x is not None else 0

    msg = job_pb2.Progress(
        fraction=_finite(p.get("fraction", 0.0), 0.0, 1.0) or 0.0,
        stage=_text(p.get("stage")),
        message=_text(p.get("message")),
        done=count("done"),
        total=count("total"),
        unit=_text(p.get("unit")),
        rate=_finite(p.get("rate", 0.0), 0.0, math.inf) or 0.0,
    )
    eta_s = _finite(p.get("eta_s"), 0.0, _MAX_ETA_S)
    if eta_s is not None:
        msg.eta.FromTimedelta(timedelta(seconds=eta_s))
    now = time.time()
    when = _finite(p.get("time", now), 0.0, 253_402_300_799.0)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((when if when is not None else now) * 1e9))
    msg.update_time.CopyFrom(ts)
    return msg


class Agent:
    """A `spool-worker`: holds the stream and the slots, maps one onto the other."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
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
        self.jobs: dict[JobKey, JobRun] = {}
        self.job_types: list[str] = []
        self.device: dict[str, Any] = {}
        self._outbox: deque[_Out] = deque()
        #: jobs held and not finished (running or waiting for a slot)
        self._running = 0
        #: prefetched jobs waiting for a free slot, in arrival order
        self._waiting: deque[JobKey] = deque()
        #: outcomes written on this stream, kept until control acknowledges them
        self._unacked: dict[JobKey, _Out] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._connected = False
        self._credits = 0
        self._draining = False
        #: set at the end of a drain: the writer half-closes the stream
        self._half_close = False
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None
        self._drain_reason = ""
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.lease_s = 0.0
        #: the control plane on this stream reads ConnectRequest.Batch
        self._batches = False
        #: counters, for logs and tests
        self.stats = {"sessions": 0, "assigned": 0, "released": 0, "completed": 0,
                      "failed": 0, "canceled": 0, "killed": 0}  # fmt: skip

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
            connect = asyncio.create_task(self._connect_loop(), name="connect-loop")
            try:
                await self._stopped.wait()
            finally:
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connect
        finally:
            for run in self.jobs.values():
                run.cancel_timers()
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
        for key in list(self._waiting):
            run = self.jobs.get(key)
            if run is not None:
                run.releasing = True
                self._end_waiting(run, "killed")
        log.info("draining (%s): %d job(s) running", reason, self._unfinished())
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self._unfinished() and time.monotonic() < deadline:
            await self._wait_changed(deadline - time.monotonic())
        self.pool.stop_restarting()
        for run in list(self.jobs.values()):
            if not run.finished:
                run.releasing = True
                self.pool.kill_job(run.key)
        deadline = time.monotonic() + FINAL_FLUSH_TIMEOUT_S
        while self._undelivered() and time.monotonic() < deadline:
            await self._wait_changed(deadline - time.monotonic())
        if self._undelivered():
            log.warning("exiting with %d unacknowledged result(s)", self._undelivered())
        elif self._connected:
            # End the stream by half-closing it and waiting for control to close its
            # side: control then has read and applied every message. Cancelling the
            # call instead could drop the last ones (a Released still in flight).
            self._half_close = True
            self._wake.set()
            while self._connected and time.monotonic() < deadline:
                await self._wait_changed(deadline - time.monotonic())
        self._stopped.set()

    async def _wait_changed(self, wait_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(wait_s, 0.0))

    def _unfinished(self) -> int:
        return self._running

    def _undelivered(self) -> int:
        """Outcomes control has not acknowledged yet (queued or written)."""
        return sum(1 for o in self._outbox if o.durable) + len(self._unacked)

    def _held(self) -> list[JobKey]:
        """Attempts this worker holds: running, or finished with the outcome unacknowledged."""
        keys = dict.fromkeys(self.jobs)
        keys.update(dict.fromkeys(k for k in self._unacked))
        keys.update(dict.fromkeys(o.done_key for o in self._outbox if o.done_key is not None))
        return list(keys)

    # -- the stream -------------------------------------------------------------
    async def _connect_loop(self) -> None:
        failures = 0
        while True:
            welcomed = False
            try:
                welcomed = await self._session()
                log.warning("control plane closed the stream")
            except grpc.aio.AioRpcError as exc:
                log.warning("stream to %s failed: %s %s", self.settings.server,
                            exc.code().name, exc.details())  # fmt: skip
            except (TimeoutError, ConnectionError, _ProtocolError) as exc:
                log.warning("stream to %s failed: %s", self.settings.server, exc)
            except Exception:
                # Whatever went wrong, the worker must come back: log and reconnect.
                log.exception("stream to %s failed unexpectedly", self.settings.server)
            finally:
                self._on_disconnect()
            failures = 0 if welcomed else failures + 1
            delay = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures) * random.uniform(0.5, 1)
            await asyncio.sleep(delay)

    def _hello(self) -> Req:
        s = self.settings
        dev = self.device
        return Req(
            hello=Req.Hello(
                worker_id=self.worker_id,
                name=s.name,
                labels=s.labels,
                job_types=self.job_types,
                slots=s.slots,
                device=job_pb2.Device(
                    kind=dev.get("kind", "cpu"),
                    index=dev.get("index", 0),
                    name=dev.get("name", ""),
                    memory_bytes=dev.get("memory_bytes", 0),
                ),
                version=_version(),
                prefetch=s.prefetch,
                running=[_ref(k) for k in self._held()],
                accepts_batches=True,
            )
        )

    async def _session(self) -> bool:
        """One stream from Hello to its end; True if it got as far as Welcome."""
        s = self.settings
        creds = channel_credentials(s.connection())
        opts = channel_options(s)
        channel = (
            grpc.aio.secure_channel(s.server, creds, options=opts)
            if creds is not None
            else grpc.aio.insecure_channel(s.server, options=opts)
        )
        metadata_ = (("authorization", f"Bearer {s.token}"),) if s.token else None
        try:
            call = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(metadata=metadata_)
            await call.write(self._hello())
            first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT_S)
            if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
                raise _ProtocolError(f"expected Welcome, got {first!r}")
            self._on_welcome(first.welcome)
            tasks = [
                asyncio.create_task(self._reader(call), name="stream-reader"),
                asyncio.create_task(self._writer(call), name="stream-writer"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
            for r in results:
                if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError):
                    raise r
            return True
        finally:
            await channel.close()

    def _on_welcome(self, w: worker_service_pb2.ConnectResponse.Welcome) -> None:
        hb = w.heartbeat_interval.ToTimedelta().total_seconds()
        self.heartbeat_interval_s = hb if hb > 0 else DEFAULT_HEARTBEAT_INTERVAL_S
        self.lease_s = w.lease_duration.ToTimedelta().total_seconds()
        self._batches = w.accepts_batches
        if w.worker_id and w.worker_id != self.worker_id:
            log.info("control calls this worker %s", w.worker_id)
        self.stats["sessions"] += 1
        self._connected = True
        metrics.set_connected(True)
        self._credits = 0
        log.info("connected to %s (replica %s, lease %.1fs, heartbeat %.1fs, %d job(s) held)",
                 self.settings.server, w.control_replica or "?", self.lease_s,
                 self.heartbeat_interval_s, len(self.jobs))  # fmt: skip
        for run in self.jobs.values():
            if not run.finished and run.latest_progress is not None:
                self._schedule_progress(run)
        self._top_up_credits()
        self._wake.set()

    def _on_disconnect(self) -> None:
        if self._connected:
            log.info("disconnected; %d job(s) held", len(self.jobs))
        self._connected = False
        metrics.set_connected(False)
        self._credits = 0
        # Progress, credits and heartbeats belong to the stream that ended;
        # outcomes written but not acknowledged go out again first.
        kept = deque(self._unacked.values())
        kept.extend(o for o in self._outbox if o.durable)
        self._outbox = kept
        self._unacked.clear()
        self._changed.set()

    async def _reader(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("message") == "batch":
                for item in msg.batch.messages:
                    self._on_message(item)
            else:
                self._on_message(msg)

    def _on_message(self, msg: worker_service_pb2.ConnectResponse) -> None:
        kind = msg.WhichOneof("message")
        if kind == "assign":
            self._on_assign(msg.assign)
        elif kind == "cancel":
            self._on_cancel(msg.cancel)
        elif kind == "drain":
            self.request_drain(f"control asked: {msg.drain.reason or 'drain'}")
        elif kind == "ack":
            self._on_ack(msg.ack)
        elif kind == "welcome":
            log.warning("ignoring a second Welcome on one stream")
        else:
            log.warning("ignoring unknown message from control: %s", kind)

    async def _writer(self, call: Any) -> None:
        while True:
            while self._outbox:
                # Everything queued goes out in one message when control reads
                # batches: one stream write per burst of outcomes, not per job.
                items = list(self._outbox)
                msgs = [m for item in items for m in item.msgs]
                if self._batches:
                    for run in batching.chunks(msgs):
                        await call.write(
                            run[0] if len(run) == 1 else Req(batch=Req.Batch(messages=run))
                        )
                else:
                    for msg in msgs:
                        await call.write(msg)
                for item in items:
                    self._outbox.popleft()
                    if item.done_key is not None:
                        self._unacked[item.done_key] = item
            self._changed.set()
            if self._half_close:
                await call.done_writing()
                await asyncio.Event().wait()  # the reader ends the session at EOF
            self._wake.clear()
            await self._wake.wait()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            self._send(Req(heartbeat=Req.Heartbeat(running=[_ref(k) for k in self._held()])))

    def _send(self, *msgs: Req, durable: bool = False, done_key: JobKey | None = None) -> None:
        if not durable and not self._connected:
            return
        self._outbox.append(_Out(msgs, durable, done_key))
        self._wake.set()

    def _on_slot_idle(self) -> None:
        """A slot became free: its CUDA figures changed, and it can take a job."""
        metrics.set_gpu_memory(self.pool.cuda_memory())
        self._start_waiting()
        self._top_up_credits()

    def _start_waiting(self) -> None:
        """Start prefetched jobs on the free slots, oldest first."""
        while self._waiting and self.pool.idle_count() > 0:
            run = self.jobs.get(self._waiting.popleft())
            if run is None or run.finished or run.waiting_spec is None:
                continue
            spec, run.waiting_spec = run.waiting_spec, None
            if self.pool.start_job(run.key, spec) is None:  # pragma: no cover - idle checked
                run.waiting_spec = spec
                self._waiting.appendleft(run.key)
                return

    def _end_waiting(self, run: JobRun, status: str) -> bool:
        """End a prefetched job that never started (cancel, timeout, drain); False if it runs."""
        if run.waiting_spec is None:
            return False
        run.waiting_spec = None
        with contextlib.suppress(ValueError):
            self._waiting.remove(run.key)
        self._on_done(run.key, {"status": status})
        self._top_up_credits()
        return True

    def _top_up_credits(self) -> None:
        """Announce capacity not yet announced on this stream (credits are incremental).

        Capacity is the free slots plus the prefetch allowance not taken by jobs
        already waiting here.
        """
        if not self._connected or self._draining:
            return
        capacity = self.pool.idle_count() + self.settings.prefetch - len(self._waiting)
        n = capacity - self._credits
        if n > 0:
            self._credits += n
            self._send(Req(ready=Req.Ready(credits=n)))

    # -- control → worker -------------------------------------------------------
    def _on_assign(self, a: worker_service_pb2.ConnectResponse.Assign) -> None:
        job = a.job
        key: JobKey = (job.id, a.attempt or job.attempt)
        self._credits = max(0, self._credits - 1)
        self.stats["assigned"] += 1
        if key in self.jobs:
            log.warning("duplicate Assign for job %s attempt %d ignored", *key)
            return
        reason = ""
        if self._draining:
            reason = "worker is draining"
        elif job.type not in self.job_types:
            reason = f"job type {job.type!r} is not served here"
        if not reason:
            run = JobRun(key=key, job_type=job.type, started=time.monotonic())
            spec = {
                "job_id": job.id,
                "attempt": key[1],
                "type": job.type,
                "params": json_format.MessageToDict(job.params),
                "inputs": list(job.inputs),
                "tenant": job.tenant,
            }
            if self.pool.start_job(key, spec) is not None:
                log.debug("job %s attempt %d (%s) started", key[0], key[1], job.type)
            elif len(self._waiting) < self.settings.prefetch:
                run.waiting_spec = spec
                self._waiting.append(key)
            else:
                reason = "no free slot"
        if not reason:
            self.jobs[key] = run
            self._running += 1
            # The attempt's clock runs from its claim, waiting or not.
            timeout_s = job.timeout.ToTimedelta().total_seconds()
            if timeout_s > 0:
                run.timeout_handle = asyncio.get_running_loop().call_later(
                    timeout_s + LOCAL_TIMEOUT_MARGIN_S, self._on_local_timeout, key
                )
            metrics.RUNNING_JOBS.set(self._unfinished())
            return
        log.warning("releasing job %s attempt %d: %s", key[0], key[1], reason)
        self.stats["released"] += 1
        self._send(
            Req(released=Req.Released(ref=_ref(key), reason=reason)), durable=True, done_key=key
        )

    def _on_ack(self, ack: worker_service_pb2.ConnectResponse.Ack) -> None:
        """Control committed these outcomes: forget them (and their jobs)."""
        for entry in ack.outcomes:
            key: JobKey = (entry.ref.job_id, entry.ref.attempt)
            if self._unacked.pop(key, None) is None:
                continue
            if not entry.applied:
                log.info("control refused the outcome of job %s attempt %d: %s",
                         key[0], key[1], entry.reason or "no reason given")  # fmt: skip
            self.jobs.pop(key, None)
        self._changed.set()

    def _on_cancel(self, c: worker_service_pb2.ConnectResponse.Cancel) -> None:
        key: JobKey = (c.ref.job_id, c.ref.attempt)
        run = self.jobs.get(key)
        if run is None or run.finished:
            log.info("Cancel for job %s attempt %d, which is not running here", *key)
            return
        if run.cancel_requested:
            return
        run.cancel_requested = True
        if self._end_waiting(run, "cancelled"):
            return
        self.pool.cancel(key)
        grace = c.grace_period.ToTimedelta().total_seconds() or DEFAULT_CANCEL_GRACE_S
        log.info("cancelling job %s attempt %d (%s); forced stop in %.1fs",
                 key[0], key[1], c.reason or "no reason", grace)  # fmt: skip
        if run.kill_handle is not None:
            run.kill_handle.cancel()
        run.kill_handle = asyncio.get_running_loop().call_later(grace, self._force_stop, key)

    def _on_local_timeout(self, key: JobKey) -> None:
        run = self.jobs.get(key)
        if run is None or run.finished or run.cancel_requested:
            return
        log.warning("job %s attempt %d passed its timeout; cancelling", *key)
        run.timed_out = True
        if self._end_waiting(run, "cancelled"):
            return
        self.pool.cancel(key)
        run.kill_handle = asyncio.get_running_loop().call_later(
            DEFAULT_CANCEL_GRACE_S, self._force_stop, key
        )

    def _force_stop(self, key: JobKey) -> None:
        run = self.jobs.get(key)
        if run is not None and not run.finished:
            log.warning("job %s attempt %d ignored its cancel; stopping it by force", *key)
            self.pool.kill_job(key)

    # -- slots → worker ---------------------------------------------------------
    def _on_progress(self, key: JobKey, progress: dict[str, Any]) -> None:
        run = self.jobs.get(key)
        if run is None or run.finished:
            return
        run.latest_progress = progress
        metrics.job_progress(key, run.job_type, progress, time.monotonic() - run.started)
        self._schedule_progress(run)

    def _schedule_progress(self, run: JobRun) -> None:
        """Send now if the last update is old enough, else once it is (latest wins)."""
        if not self._connected or run.flush_handle is not None:
            return
        wait = run.progress_sent_at + PROGRESS_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._flush_progress(run.key)
        else:
            run.flush_handle = asyncio.get_running_loop().call_later(
                wait, self._flush_progress, run.key
            )

    def _flush_progress(self, key: JobKey) -> None:
        run = self.jobs.get(key)
        if run is None or run.finished:
            return
        run.flush_handle = None
        if run.latest_progress is None or not self._connected:
            return
        p, run.latest_progress = run.latest_progress, None
        run.progress_sent_at = time.monotonic()
        self._send(Req(progress=Req.ProgressUpdate(ref=_ref(key), progress=progress_to_proto(p))))

    def _on_done(self, key: JobKey, outcome: dict[str, Any]) -> None:
        run = self.jobs.get(key)
        if run is None or run.finished:
            return
        run.cancel_timers()
        run.finished = True
        self._running -= 1
        msgs: list[Req] = []
        if run.latest_progress is not None:
            # The final progress value always reaches control, before the result.
            p = progress_to_proto(run.latest_progress)
            run.latest_progress = None
            msgs.append(Req(progress=Req.ProgressUpdate(ref=_ref(key), progress=p)))
        msg = self._terminal_message(run, outcome)
        kind = msg.WhichOneof("message") or "?"
        self.stats[kind] = self.stats.get(kind, 0) + 1
        if outcome["status"] == "killed":
            self.stats["killed"] += 1
        duration_s = time.monotonic() - run.started
        metrics.job_finished(key, run.job_type, kind, duration_s)
        metrics.RUNNING_JOBS.set(self._unfinished())
        # One line per job at INFO would cost more than a no-op job: only the
        # ones that did not succeed are logged at INFO.
        log.log(logging.DEBUG if kind == "completed" else logging.INFO,
                "job %s attempt %d %s in %.2fs", key[0], key[1],
                 kind if kind != "failed" else f"failed ({msg.failed.error.code})",
                 duration_s)  # fmt: skip
        self._send(*msgs, msg, durable=True, done_key=key)
        self._changed.set()

    def _terminal_message(self, run: JobRun, outcome: dict[str, Any]) -> Req:
        ref = _ref(run.key)
        status = outcome["status"]
        if status == "completed":
            try:
                result = struct_pb2.Struct()
                result.update(outcome.get("result") or {})
                outputs = [_text(o) for o in outcome.get("outputs", [])]
                return Req(completed=Req.Completed(ref=ref, result=result, outputs=outputs))
            except (TypeError, ValueError) as exc:
                log.warning("job %s attempt %d: its result cannot be sent: %s", *run.key, exc)
                return self._failure(
                    ref, "INVALID_RESULT", f"the handler's result cannot be sent: {exc}"[:500],
                    retryable=False,
                )  # fmt: skip
        if status == "failed":
            failed = Req.Failed(
                ref=ref,
                error=job_pb2.JobError(
                    code=_text(outcome.get("code", "HANDLER_ERROR")),
                    message=_text(outcome.get("message", "")),
                    retryable=bool(outcome.get("retryable", True)),
                ),
            )
            # Control caps the delay at its backoff maximum; here it only has to fit.
            delay_s = _finite(outcome.get("retry_delay_s"), 0.0, _MAX_ETA_S)
            if delay_s:
                failed.retry_delay.CopyFrom(
                    duration_pb2.Duration(seconds=int(delay_s), nanos=int((delay_s % 1) * 1e9))
                )
            return Req(failed=failed)
        # cancelled (the handler stopped), killed (forced stop) or crashed:
        if run.releasing:
            return Req(released=Req.Released(ref=ref, reason="worker is draining"))
        if run.cancel_requested:
            return Req(canceled=Req.Canceled(ref=ref))
        if run.timed_out:
            return self._failure(ref, "DEADLINE_EXCEEDED", "the attempt passed its timeout")
        if status == "crashed":
            return self._failure(
                ref, "WORKER_CRASH",
                f"the slot process died (exit code {outcome.get('exit_code')})",
            )  # fmt: skip
        return self._failure(ref, "HANDLER_ERROR", "the handler raised Cancelled without a cancel")

    @staticmethod
    def _failure(
        ref: worker_service_pb2.AttemptRef, code: str, message: str, *, retryable: bool = True
    ) -> Req:
        return Req(
            failed=Req.Failed(
                ref=ref, error=job_pb2.JobError(code=code, message=message, retryable=retryable)
            )
        )


class _ProtocolError(Exception):
    """Control answered something unexpected."""
