"""The worker's end of WorkerService.Connect: the only module that speaks protobuf.

`Stream.run` connects forever (exponential backoff with full jitter), and per
stream sends Hello, waits for Welcome, then runs a reader, a writer and a
heartbeat. What it reads is decoded into plain calls on `StreamEvents` (the
agent); what the agent sends it (progress, outcomes, credits) is encoded here.

Stream rules (protos/spool/v1/worker_service.proto, docs/workers-protocol.md):
- Hello first (with the attempts still held from before a reconnect), then
  Welcome; credits are incremental: `offer(capacity)` sends Ready(n) for the
  capacity not announced yet on this stream.
- Outcomes (Completed/Failed/Canceled/Released, each preceded by the attempt's
  last progress) are durable: queued while no stream is up, and once written
  kept until control's Ack, then resent after a reconnect until acknowledged.
  Progress, credits and heartbeats belong to one stream.
- Everything queued goes out as one `Batch` message when control reads them
  (`spool.batching` keeps each within its limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from spool import batching
from spool.v1 import job_pb2, worker_service_pb2, worker_service_pb2_grpc
from worker import metrics
from worker._attempts import (
    Assignment,
    Canceled,
    Completed,
    Failed,
    JobKey,
    Released,
    Terminal,
)
from worker._config import WorkerSettings, channel_credentials, channel_options
from worker._outcome import Progress

log = logging.getLogger("spool.worker")

Req = worker_service_pb2.ConnectRequest

#: used when Welcome gives no heartbeat interval
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
#: reconnect backoff: base * 2**n with full jitter, capped
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 10.0
#: how long to wait for Welcome after Hello
WELCOME_TIMEOUT_S = 10.0


def _version() -> str:
    try:
        return metadata.version("spool")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- encoding ---------------------------------------------------------------------
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


def progress_to_proto(p: Progress) -> job_pb2.Progress:
    """A `Progress` (worker._context.build_progress) as a `Progress` message.

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


def _progress_message(key: JobKey, p: Progress) -> Req:
    return Req(progress=Req.ProgressUpdate(ref=_ref(key), progress=progress_to_proto(p)))


def _failed_message(ref: worker_service_pb2.AttemptRef, f: Failed) -> Req:
    failed = Req.Failed(
        ref=ref,
        error=job_pb2.JobError(code=_text(f.code), message=_text(f.message),
                               retryable=bool(f.retryable)),
    )  # fmt: skip
    # Control caps the delay at its backoff maximum; here it only has to fit.
    delay_s = _finite(f.retry_delay_s, 0.0, _MAX_ETA_S)
    if delay_s:
        failed.retry_delay.CopyFrom(
            duration_pb2.Duration(seconds=int(delay_s), nanos=int((delay_s % 1) * 1e9))
        )
    return Req(failed=failed)


def terminal_message(key: JobKey, t: Terminal) -> tuple[Terminal, Req]:
    """The message for an attempt's outcome, and the outcome it says.

    A result that a `Struct` cannot carry (a lone surrogate, say) turns the
    outcome into a non-retryable INVALID_RESULT failure.
    """
    ref = _ref(key)
    if isinstance(t, Completed):
        try:
            result = struct_pb2.Struct()
            result.update(t.result)
            outputs = [_text(o) for o in t.outputs]
            return t, Req(completed=Req.Completed(ref=ref, result=result, outputs=outputs))
        except (TypeError, ValueError) as exc:
            log.warning("job %s attempt %d: its result cannot be sent: %s", *key, exc)
            t = Failed("INVALID_RESULT", f"the handler's result cannot be sent: {exc}"[:500],
                       retryable=False)  # fmt: skip
    if isinstance(t, Failed):
        return t, _failed_message(ref, t)
    if isinstance(t, Canceled):
        return t, Req(canceled=Req.Canceled(ref=ref))
    assert isinstance(t, Released)
    return t, Req(released=Req.Released(ref=ref, reason=t.reason))


def _assignment(a: worker_service_pb2.ConnectResponse.Assign) -> Assignment:
    job = a.job
    attempt = a.attempt or job.attempt
    spec = {
        "job_id": job.id,
        "attempt": attempt,
        "type": job.type,
        "params": json_format.MessageToDict(job.params) if job.params.fields else {},
        "inputs": list(job.inputs),
        "tenant": job.tenant,
    }
    timeout_s = job.timeout.seconds + job.timeout.nanos / 1e9
    return Assignment(key=(job.id, attempt), job_type=job.type, spec=spec, timeout_s=timeout_s)


# -- the stream -------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    """What control's Welcome said."""

    replica: str
    lease_s: float
    heartbeat_interval_s: float


class StreamEvents(Protocol):
    """What the stream tells its owner (the agent), decoded."""

    def held(self) -> Iterable[JobKey]:
        """The attempts the owner holds (running, or finished and not acknowledged)."""

    def on_welcome(self, session: Session) -> None: ...
    def on_disconnect(self) -> None:
        """A welcomed stream ended."""

    def on_assign(self, a: Assignment) -> None: ...
    def on_cancel(self, key: JobKey, grace_s: float, reason: str) -> None: ...
    def on_drain(self, reason: str) -> None: ...
    def on_acked(self, key: JobKey, applied: bool, reason: str) -> None:
        """Control committed (or refused) the outcome it acknowledges."""


@dataclass
class _Out:
    """Queued stream messages (written in order). Durable ones survive a reconnect."""

    msgs: tuple[Req, ...]
    durable: bool
    #: set on an attempt's outcome: once written it waits for control's Ack, and
    #: is resent after a reconnect until then
    done_key: JobKey | None = None


class Stream:
    """One worker's WorkerService.Connect, reconnected forever."""

    def __init__(self, settings: WorkerSettings, events: StreamEvents) -> None:
        self.settings = settings
        self._events = events
        #: what Hello says about this worker (set by the owner before `run`)
        self.worker_id = settings.worker_id
        self.job_types: list[str] = []
        self.device: dict[str, Any] = {}
        self._outbox: deque[_Out] = deque()
        #: outcomes written on this stream, kept until control acknowledges them
        self._unacked: dict[JobKey, _Out] = {}
        self._wake = asyncio.Event()
        #: set whenever deliveries progress (written, acknowledged, stream lost)
        self.changed = asyncio.Event()
        self.connected = False
        self._credits = 0
        #: set at the end of a drain: the writer half-closes the stream
        self._half_close = False
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.lease_s = 0.0
        #: the control plane on this stream reads ConnectRequest.Batch
        self._batches = False

    # -- what the owner sends -------------------------------------------------
    def send_progress(self, key: JobKey, progress: Progress) -> None:
        """A progress update, on this stream only (dropped while none is up)."""
        self._send(_progress_message(key, progress))

    def send_outcome(self, key: JobKey, terminal: Terminal, last: Progress | None) -> Terminal:
        """An attempt's outcome (after its last progress), delivered until acknowledged.

        Returns the outcome as sent (see `terminal_message`).
        """
        terminal, msg = terminal_message(key, terminal)
        msgs = (_progress_message(key, last), msg) if last is not None else (msg,)
        self._send(*msgs, durable=True, done_key=key)
        self.changed.set()
        return terminal

    def offer(self, capacity: int, min_batch: int = 1) -> None:
        """Announce capacity not yet announced on this stream (credits are incremental).

        While control still holds credits of ours, new ones are announced once at
        least `min_batch` have gathered: one Ready, and one claim at control, per
        batch of finished jobs rather than per job. With none outstanding, any
        capacity is announced at once, so a worker is never left idle waiting.
        """
        if not self.connected:
            return
        n = capacity - self._credits
        if n > 0 and (n >= min_batch or self._credits == 0):
            self._credits += n
            self._send(Req(ready=Req.Ready(credits=n)))

    def half_close(self) -> None:
        """End the stream cleanly: the writer half-closes it, control then closes its side."""
        self._half_close = True
        self._wake.set()

    def undelivered(self) -> int:
        """Outcomes control has not acknowledged yet (queued or written)."""
        return sum(1 for o in self._outbox if o.durable) + len(self._unacked)

    def held(self) -> list[JobKey]:
        """Attempts this worker holds: the owner's, and those with an outcome unacknowledged."""
        keys = dict.fromkeys(self._events.held())
        keys.update(dict.fromkeys(self._unacked))
        keys.update(dict.fromkeys(o.done_key for o in self._outbox if o.done_key is not None))
        return list(keys)

    async def wait_changed(self, wait_s: float) -> None:
        """Wait until deliveries progress, at most `wait_s`."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), max(wait_s, 0.0))

    def _send(self, *msgs: Req, durable: bool = False, done_key: JobKey | None = None) -> None:
        if not durable and not self.connected:
            return
        self._outbox.append(_Out(msgs, durable, done_key))
        self._wake.set()

    # -- connecting -----------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect: forever (cancel to stop)."""
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
                running=[_ref(k) for k in self.held()],
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
        self.connected = True
        metrics.set_connected(True)
        self._credits = 0
        self._events.on_welcome(Session(w.control_replica, self.lease_s, self.heartbeat_interval_s))
        self._wake.set()

    def _on_disconnect(self) -> None:
        if self.connected:
            self._events.on_disconnect()
        self.connected = False
        metrics.set_connected(False)
        self._credits = 0
        # Progress, credits and heartbeats belong to the stream that ended;
        # outcomes written but not acknowledged go out again first.
        kept = deque(self._unacked.values())
        kept.extend(o for o in self._outbox if o.durable)
        self._outbox = kept
        self._unacked.clear()
        self.changed.set()

    # -- reading --------------------------------------------------------------
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
            self._credits = max(0, self._credits - 1)
            self._events.on_assign(_assignment(msg.assign))
        elif kind == "cancel":
            c = msg.cancel
            self._events.on_cancel(
                (c.ref.job_id, c.ref.attempt), c.grace_period.ToTimedelta().total_seconds(),
                c.reason,
            )  # fmt: skip
        elif kind == "drain":
            self._events.on_drain(msg.drain.reason)
        elif kind == "ack":
            self._on_ack(msg.ack)
        elif kind == "welcome":
            log.warning("ignoring a second Welcome on one stream")
        else:
            log.warning("ignoring unknown message from control: %s", kind)

    def _on_ack(self, ack: worker_service_pb2.ConnectResponse.Ack) -> None:
        """Control committed these outcomes: stop resending them."""
        for entry in ack.outcomes:
            key: JobKey = (entry.ref.job_id, entry.ref.attempt)
            if self._unacked.pop(key, None) is not None:
                self._events.on_acked(key, entry.applied, entry.reason)
        self.changed.set()

    # -- writing --------------------------------------------------------------
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
            self.changed.set()
            if self._half_close:
                await call.done_writing()
                await asyncio.Event().wait()  # the reader ends the session at EOF
            self._wake.clear()
            await self._wake.wait()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            self._send(Req(heartbeat=Req.Heartbeat(running=[_ref(k) for k in self.held()])))


class _ProtocolError(Exception):
    """Control answered something unexpected."""
