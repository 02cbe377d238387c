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
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from control import auth, validate
from control.errors import FailedPrecondition, InvalidArgument, SpoolError, abort
from control.servicers import job_service
from control.services import dispatch
from spool import batching
from spool.v1 import job_pb2, worker_service_pb2, worker_service_pb2_grpc

log = logging.getLogger(__name__)

Request = worker_service_pb2.ConnectRequest
Response = worker_service_pb2.ConnectResponse

#: a stream that says nothing this long after opening is closed
HELLO_TIMEOUT_S = 30.0
#: limits on what a Hello may claim (a worker is trusted, but bounded)
MAX_JOB_TYPES = 256
MAX_SLOTS = 1024
MAX_PREFETCH = 1024
MAX_ID_LEN = 200
#: lengths kept of a worker's free text (longer is cut) and of its output URIs
MAX_TEXT_LEN = 200
MAX_MESSAGE_LEN = 4000
MAX_URI_LEN = 2048
MAX_OUTPUTS = 1000
#: an ETA longer than this (a year) is not an estimate: it is left out
MAX_ETA_S = 366 * 24 * 3600
#: worker messages that name an attempt, and those that end one
OUTCOME_KINDS = frozenset({"completed", "failed", "released", "canceled"})
REF_KINDS = OUTCOME_KINDS | {"progress"}
#: how long a closing stream waits for its last messages to be written
WRITER_DRAIN_TIMEOUT_S = 10.0


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _timestamp(dt: Any) -> timestamp_pb2.Timestamp:
    return job_service.timestamp(dt) or timestamp_pb2.Timestamp()


def _refs(refs: Any) -> list[tuple[str, int]]:
    """AttemptRefs as (job_id, attempt); refs whose job id is not a UUID are dropped."""
    out = []
    for r in refs:
        if _is_uuid(r.job_id):
            out.append((r.job_id, r.attempt))
        else:
            log.warning("dropping a malformed job id from a worker: %r", r.job_id[:100])
    return out


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _clean_text(value: str, max_len: int) -> str:
    """Free text from a worker, made storable: NUL removed, cut to `max_len`."""
    return value.replace("\x00", "")[:max_len]


def _finite(value: float, default: float = 0.0) -> float:
    return value if math.isfinite(value) else default


def hello_from_proto(msg: Request.Hello) -> dispatch.Hello:
    """Validate a Hello; raises InvalidArgument naming the offending field."""
    worker_id = validate.text("hello.worker_id", msg.worker_id, max_len=MAX_ID_LEN, required=True)
    if not msg.job_types or len(msg.job_types) > MAX_JOB_TYPES:
        raise InvalidArgument("hello.job_types", f"between 1 and {MAX_JOB_TYPES} job types")
    job_types = validate.text_list(
        "hello.job_types", msg.job_types, max_items=MAX_JOB_TYPES, max_len=MAX_ID_LEN
    )
    if msg.slots < 0 or msg.slots > MAX_SLOTS:
        raise InvalidArgument("hello.slots", f"between 0 and {MAX_SLOTS} (0 means 1)")
    if msg.prefetch < 0 or msg.prefetch > MAX_PREFETCH:
        raise InvalidArgument("hello.prefetch", f"between 0 and {MAX_PREFETCH}")
    device = validate.json_value(
        "hello.device", json_format.MessageToDict(msg.device, preserving_proto_field_name=True)
    )
    return dispatch.Hello(
        worker_id=worker_id,
        name=validate.text("hello.name", msg.name, max_len=MAX_TEXT_LEN),
        labels=validate.label_map("hello.labels", dict(msg.labels)),
        job_types=list(dict.fromkeys(job_types)),
        slots=msg.slots or 1,
        device=device,
        version=validate.text("hello.version", msg.version, max_len=MAX_ID_LEN),
        running=_refs(msg.running),
        accepts_batches=msg.accepts_batches,
        prefetch=msg.prefetch,
    )


def progress_to_dict(p: job_pb2.Progress) -> dict[str, Any]:
    """A Progress message as stored in `jobs.progress` / `job_events.progress`.

    Whatever a handler reported is made storable: NaN and Infinity become 0,
    text loses NUL characters and is cut to length, an out-of-range ETA or
    update time is left out.
    """
    out: dict[str, Any] = {
        "fraction": min(1.0, max(0.0, _finite(p.fraction))),
        "stage": _clean_text(p.stage, MAX_TEXT_LEN),
        "message": _clean_text(p.message, MAX_MESSAGE_LEN),
        "done": p.done,
        "total": p.total,
        "unit": _clean_text(p.unit, MAX_TEXT_LEN),
        "rate": _finite(p.rate),
    }
    if p.HasField("eta") and 0 <= p.eta.seconds <= MAX_ETA_S:
        out["eta_s"] = p.eta.seconds + p.eta.nanos / 1e9
    ts = p.update_time
    if p.HasField("update_time") and (
        validate.TIMESTAMP_MIN_SECONDS <= ts.seconds <= validate.TIMESTAMP_MAX_SECONDS
    ):
        out["time"] = ts.seconds + ts.nanos / 1e9
    return out


def _value(v: struct_pb2.Value) -> Any:
    """A Struct Value as plain data, NaN and Infinity kept (json_format refuses them)."""
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _value(item) for k, item in v.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(item) for item in v.list_value.values]
    if kind == "number_value":
        return v.number_value
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    return None


def result_from_proto(ref: Any, result: struct_pb2.Struct) -> dict[str, Any]:
    """A handler's result made storable: NaN/Infinity become null, NUL is removed (logged)."""
    data, replaced = validate.json_safe({k: _value(v) for k, v in result.fields.items()})
    if replaced:
        log.warning("job %s attempt %d: result values stored as null or cleaned: %s",
                    ref.job_id, ref.attempt, ", ".join(replaced[:10]))  # fmt: skip
    return data


def message_from_proto(req: Request, retry_delay_max_s: float) -> dispatch.Inbound | None:
    """One worker message after Hello → the dispatch message (None: nothing to do).

    Never raises for a message about a job: what cannot be read becomes an
    `Unreadable` (refused alone), so one bad message never ends the stream.
    """
    kind = req.WhichOneof("message")
    if kind == "hello":
        raise FailedPrecondition("hello sent twice on one stream")
    ref = getattr(req, kind).ref if kind in REF_KINDS else None
    if ref is not None and not _is_uuid(ref.job_id):
        return dispatch.Unreadable(
            ref.job_id, ref.attempt, "job_id is not a UUID", outcome=kind in OUTCOME_KINDS
        )
    try:
        return _message(req, kind, retry_delay_max_s)
    except Exception as exc:  # a value no check foresaw: refuse this message only
        log.exception("unreadable %s message from a worker", kind)
        if ref is None:
            return None
        return dispatch.Unreadable(
            ref.job_id, ref.attempt, f"unreadable {kind}: {exc.__class__.__name__}",
            outcome=kind in OUTCOME_KINDS,
        )  # fmt: skip


def _message(req: Request, kind: str | None, retry_delay_max_s: float) -> dispatch.Inbound | None:
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
        result = result_from_proto(c.ref, c.result) if c.HasField("result") else {}
        outputs = [_clean_text(o, MAX_URI_LEN) for o in c.outputs[:MAX_OUTPUTS]]
        return dispatch.Completed(c.ref.job_id, c.ref.attempt, result, outputs)
    if kind == "failed":
        f = req.failed
        error = {
            "code": _clean_text(f.error.code, MAX_ID_LEN) or "HANDLER_ERROR",
            "message": _clean_text(f.error.message, MAX_MESSAGE_LEN),
            "retryable": f.error.retryable,
        }
        delay = None
        if f.HasField("retry_delay"):
            # At most the backoff maximum (documented); a negative delay means none.
            seconds = min(max(f.retry_delay.seconds, 0), int(retry_delay_max_s) + 1)
            delay = min(retry_delay_max_s, seconds + max(f.retry_delay.nanos, 0) / 1e9)
        return dispatch.Failed(f.ref.job_id, f.ref.attempt, error, delay)
    if kind == "released":
        r = req.released
        return dispatch.Released(r.ref.job_id, r.ref.attempt, _clean_text(r.reason, 500))
    if kind == "canceled":
        return dispatch.Canceled(req.canceled.ref.job_id, req.canceled.ref.attempt)
    return None


class WorkerService(worker_service_pb2_grpc.WorkerServiceServicer):
    """The WorkerService servicer of one control replica."""

    def __init__(self, dispatcher: dispatch.Dispatcher, job_to_proto: Any) -> None:
        self.dispatcher = dispatcher
        # Row → the spool.v1.Job of an Assign (control.servicers.job_service).
        self.job_to_proto = job_to_proto

    def _to_proto(self, out: dispatch.Outbound) -> Response:
        if isinstance(out, dispatch.Acknowledge):
            return Response(
                ack=Response.Ack(
                    outcomes=[
                        Response.Ack.Outcome(
                            ref=worker_service_pb2.AttemptRef(job_id=a.job_id, attempt=a.attempt),
                            applied=a.applied,
                            reason=a.reason,
                        )
                        for a in out.outcomes
                    ]
                )
            )
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
        session = await self.dispatcher.guarded(
            self.dispatcher.open_session(hello, auth.current_principal())
        )
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
                        accepts_batches=True,
                    )
                )
            )
            reader = asyncio.create_task(
                self._read(requests, session), name=f"worker.{hello.worker_id}.reader"
            )
            writer = asyncio.create_task(session.run_writer(), name=f"worker.{hello.worker_id}.db")
            # If the writer gives up (database gone), the stream ends and the worker reconnects.
            writer.add_done_callback(lambda _: session.end_stream())
            while await self._write_ready(session, context):
                pass
            if reader.done() and isinstance(reader.exception(), SpoolError):
                await abort(context, reader.exception())  # type: ignore[arg-type]
        finally:
            await self.dispatcher.guarded(self._close(session, reader, writer))

    async def _write_ready(
        self, session: dispatch.WorkerSession, context: grpc.aio.ServicerContext
    ) -> bool:
        """Write what the session queued (one Batch when the worker reads them); False at the end.

        Everything already queued goes out in one message: the Assigns of one
        claim, the Acks of one committed batch, so a stream write is paid per
        batch, not per job.
        """
        queued = [await session.outbox.get()]
        while not session.outbox.empty():
            queued.append(session.outbox.get_nowait())
        end = next((i for i, item in enumerate(queued) if item is None), None)
        if end is not None:
            # Assigns queued after the end never reach the worker: they go back.
            session.unsent += [a for a in queued[end:] if isinstance(a, dispatch.Assign)]
            queued = queued[:end]
        out = []
        for item in queued:
            if isinstance(item, dispatch.Assign) and session.closed:
                # The worker stopped reading jobs (it half-closed): hand it back.
                session.unsent.append(item)
            else:
                out.append(self._to_proto(item))
        if session.hello.accepts_batches:
            for run in batching.chunks(out):
                await context.write(
                    run[0] if len(run) == 1 else Response(batch=Response.Batch(messages=run))
                )
        else:
            for msg in out:
                await context.write(msg)
        return end is None

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

    @staticmethod
    def _receive(session: dispatch.WorkerSession, req: Request, max_delay_s: float) -> None:
        msg = message_from_proto(req, max_delay_s)
        if msg is not None:
            session.receive(msg)

    async def _read(self, requests: AsyncIterator[Request], session: dispatch.WorkerSession):
        """Hand every worker message to the session until the stream ends.

        When the worker half-closes (a drain), the session applies what it read
        and acknowledges it before the stream ends (the writer's end closes the
        outbox); when the stream breaks, the outbox is closed at once.
        """
        max_delay_s = self.dispatcher.settings.retry_backoff_max_s
        half_closed = False
        try:
            async for req in requests:
                if req.WhichOneof("message") == "batch":
                    for item in req.batch.messages:
                        if item.WhichOneof("message") == "batch":
                            log.warning("worker %s: a Batch inside a Batch ignored",
                                        session.worker_id)  # fmt: skip
                            continue
                        self._receive(session, item, max_delay_s)
                else:
                    self._receive(session, req, max_delay_s)
            half_closed = True
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            if half_closed:
                session.closed = True  # no more assignments; acks still go out
                session.finish()
            else:
                session.end_stream()
