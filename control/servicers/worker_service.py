"""WorkerService: the Connect stream, converting protobuf ⇄ dispatch messages.

One stream per worker. The first message must be `Hello`; the reply is
`Welcome` (lease and heartbeat periods), followed by any `Cancel` for attempts
the worker reported that are no longer its. Then a reader task hands each
worker message to the session (`control.services.dispatch.WorkerSession`) and
this coroutine writes what the session queues (`Assign`, `Cancel`) until the
stream ends, however it ends (worker gone, keepalive timeout, server stop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from control.errors import FailedPrecondition, InvalidArgument, SpoolError, abort
from control.services import dispatch
from spool.v1 import job_pb2, worker_service_pb2, worker_service_pb2_grpc

log = logging.getLogger(__name__)

Request = worker_service_pb2.ConnectRequest
Response = worker_service_pb2.ConnectResponse

#: a stream that says nothing this long after opening is closed
HELLO_TIMEOUT_S = 30.0
#: limits on what a Hello may claim (a worker is trusted, but bounded)
MAX_JOB_TYPES = 256
MAX_SLOTS = 1024
MAX_ID_LEN = 200
#: how long a closing stream waits for its last messages to be written
WRITER_DRAIN_TIMEOUT_S = 10.0


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _timestamp(dt: Any) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if dt is not None:
        ts.FromDatetime(dt)
    return ts


def _refs(refs: Any) -> list[tuple[str, int]]:
    return [(r.job_id, r.attempt) for r in refs]


def hello_from_proto(msg: Request.Hello) -> dispatch.Hello:
    """Validate a Hello; raises InvalidArgument naming the offending field."""
    if not msg.worker_id or len(msg.worker_id) > MAX_ID_LEN:
        raise InvalidArgument("hello.worker_id", f"required, at most {MAX_ID_LEN} characters")
    if not msg.job_types or len(msg.job_types) > MAX_JOB_TYPES:
        raise InvalidArgument("hello.job_types", f"between 1 and {MAX_JOB_TYPES} job types")
    if msg.slots < 0 or msg.slots > MAX_SLOTS:
        raise InvalidArgument("hello.slots", f"between 0 and {MAX_SLOTS} (0 means 1)")
    device = json_format.MessageToDict(msg.device, preserving_proto_field_name=True)
    return dispatch.Hello(
        worker_id=msg.worker_id,
        name=msg.name,
        labels=dict(msg.labels),
        job_types=list(dict.fromkeys(msg.job_types)),
        slots=msg.slots or 1,
        device=device,
        version=msg.version,
        running=_refs(msg.running),
    )


def progress_to_dict(p: job_pb2.Progress) -> dict[str, Any]:
    """A Progress message as stored in `jobs.progress` / `job_events.progress`."""
    out: dict[str, Any] = {
        "fraction": min(1.0, max(0.0, p.fraction)),
        "stage": p.stage,
        "message": p.message,
        "done": p.done,
        "total": p.total,
        "unit": p.unit,
        "rate": p.rate,
    }
    if p.HasField("eta"):
        out["eta_s"] = p.eta.ToNanoseconds() / 1e9
    if p.HasField("update_time"):
        out["time"] = p.update_time.ToNanoseconds() / 1e9
    return out


def message_from_proto(req: Request) -> dispatch.Inbound | None:
    """One worker message after Hello → the dispatch message (None: nothing to do)."""
    kind = req.WhichOneof("message")
    if kind == "ready":
        return dispatch.Ready(req.ready.credits)
    if kind == "progress":
        ref = req.progress.ref
        return dispatch.ProgressReport(
            ref.job_id, ref.attempt, progress_to_dict(req.progress.progress)
        )
    if kind == "heartbeat":
        return dispatch.Heartbeat(_refs(req.heartbeat.running))
    if kind == "completed":
        c = req.completed
        result = json_format.MessageToDict(c.result) if c.HasField("result") else {}
        return dispatch.Completed(c.ref.job_id, c.ref.attempt, result, list(c.outputs))
    if kind == "failed":
        f = req.failed
        error = {
            "code": f.error.code or "HANDLER_ERROR",
            "message": f.error.message[:4000],
            "retryable": f.error.retryable,
        }
        delay = f.retry_delay.ToNanoseconds() / 1e9 if f.HasField("retry_delay") else None
        return dispatch.Failed(f.ref.job_id, f.ref.attempt, error, delay)
    if kind == "released":
        r = req.released
        return dispatch.Released(r.ref.job_id, r.ref.attempt, r.reason[:500])
    if kind == "canceled":
        return dispatch.Canceled(req.canceled.ref.job_id, req.canceled.ref.attempt)
    if kind == "hello":
        raise FailedPrecondition("hello sent twice on one stream")
    return None


class WorkerService(worker_service_pb2_grpc.WorkerServiceServicer):
    """The WorkerService servicer of one control replica."""

    def __init__(self, dispatcher: dispatch.Dispatcher, job_to_proto: Any) -> None:
        self.dispatcher = dispatcher
        # Row → spool.v1.Job, shared with JobService so both speak the same Job.
        self.job_to_proto = job_to_proto

    def _to_proto(self, out: dispatch.Outbound) -> Response:
        if isinstance(out, dispatch.Assign):
            return Response(
                assign=Response.Assign(
                    job=self.job_to_proto(out.job),
                    attempt=out.attempt,
                    lease_deadline=_timestamp(out.lease_deadline),
                )
            )
        return Response(
            cancel=Response.Cancel(
                ref=worker_service_pb2.AttemptRef(job_id=out.job_id, attempt=out.attempt),
                reason=out.reason,
                grace_period=_duration(out.grace_s),
            )
        )

    async def Connect(  # type: ignore[override]  # writes with context.write, not yield
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> None:
        """Hello → Welcome, then Assign/Cancel out and worker reports in, until the end."""
        requests = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(requests), HELLO_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration):
            await abort(context, InvalidArgument("hello", "the first message must be a Hello"))
        try:
            if first.WhichOneof("message") != "hello":
                raise InvalidArgument("hello", "the first message must be a Hello")
            hello = hello_from_proto(first.hello)
        except SpoolError as exc:
            await abort(context, exc)
        session = await self.dispatcher.guarded(self.dispatcher.open_session(hello))
        settings = self.dispatcher.settings
        reader = writer = None
        try:
            await context.write(
                Response(
                    welcome=Response.Welcome(
                        worker_id=hello.worker_id,
                        lease_duration=_duration(settings.lease_s),
                        heartbeat_interval=_duration(settings.heartbeat_s),
                        control_replica=self.dispatcher.replica_id,
                    )
                )
            )
            reader = asyncio.create_task(
                self._read(requests, session), name=f"worker.{hello.worker_id}.reader"
            )
            writer = asyncio.create_task(session.run_writer(), name=f"worker.{hello.worker_id}.db")
            # If the writer gives up (database gone), the stream ends and the worker reconnects.
            writer.add_done_callback(lambda _: session.outbox.put_nowait(None))
            while True:
                out = await session.outbox.get()
                if out is None:
                    break
                await context.write(self._to_proto(out))
            if reader.done() and isinstance(reader.exception(), SpoolError):
                await abort(context, reader.exception())  # type: ignore[arg-type]
        finally:
            await self.dispatcher.guarded(self._close(session, reader, writer))

    async def _close(
        self,
        session: dispatch.WorkerSession,
        reader: asyncio.Task[None] | None,
        writer: asyncio.Task[None] | None,
    ) -> None:
        """Stop reading, let the writer apply what the worker already said, close."""
        session.closed = True  # no more assignments to this stream
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if writer is not None:
            session.finish()
            try:
                await asyncio.wait_for(writer, WRITER_DRAIN_TIMEOUT_S)
            except Exception:
                log.warning("worker %s: last messages not applied", session.worker_id)
        await self.dispatcher.close_session(session)

    async def _read(self, requests: AsyncIterator[Request], session: dispatch.WorkerSession):
        """Hand every worker message to the session; end the outbox when the stream ends."""
        try:
            async for req in requests:
                msg = message_from_proto(req)
                if msg is not None:
                    session.receive(msg)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            session.outbox.put_nowait(None)
