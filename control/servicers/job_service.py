"""JobService: protobuf ⇄ domain conversion around control.services.jobs.

Handlers raise SpoolError subclasses; the error interceptor maps them to
statuses. The caller's tenant comes from `control.auth.current_principal()`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from control import validate
from control.auth import current_principal
from control.config import Settings
from control.db import Database
from control.errors import InvalidArgument
from control.notify import Notifier
from control.services.jobs import MAX_BATCH, JobSpec, JobsService, in_turns, parse_job_id
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

log = logging.getLogger(__name__)

pb = job_service_pb2

_STATE_TO_PROTO = {
    "queued": job_pb2.JOB_STATE_QUEUED,
    "running": job_pb2.JOB_STATE_RUNNING,
    "succeeded": job_pb2.JOB_STATE_SUCCEEDED,
    "failed": job_pb2.JOB_STATE_FAILED,
    "canceled": job_pb2.JOB_STATE_CANCELED,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}
_EVENT_KIND_TO_PROTO = {
    "state": job_pb2.JOB_EVENT_KIND_STATE,
    "progress": job_pb2.JOB_EVENT_KIND_PROGRESS,
    "cancel_requested": job_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
    "ignored": job_pb2.JOB_EVENT_KIND_IGNORED,
}


# ---------------------------------------------------------------- conversions


def _ms_to_duration(ms: int | None) -> duration_pb2.Duration | None:
    if not ms:
        return None
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(ms))
    return d


def _seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A stored (timezone-aware) time as a Timestamp, by datetime arithmetic (exact, and
    several times cheaper than Timestamp.FromDatetime)."""
    if dt is None:
        return None
    try:
        delta = dt - _EPOCH
    except OverflowError:  # at the ends of datetime's range (in a zone other than UTC)
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(dt)
        return ts
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def _struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if data is None:
        return None
    s = struct_pb2.Struct()
    if data:
        s.update(dict(data))
    return s


def _finite(value: Any, default: float | None = 0.0) -> float | None:
    """A stored number as a finite float, else `default` (stored JSON is not always tidy)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) else default


def _int64(value: Any) -> int:
    """A stored integer clamped to int64 (0 when it is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(-(2**63), min(2**63 - 1, int(value)))


def progress_to_proto(p: Mapping[str, Any] | None) -> job_pb2.Progress | None:
    """A stored progress dict (see WorkerService) as a Progress message.

    Never fails on what is stored: numbers out of a field's range are clamped
    or left out (an eta beyond a Duration's range, a time outside years 1-9999).
    """
    if not p:
        return None
    msg = job_pb2.Progress(
        fraction=_finite(p.get("fraction")),
        stage=str(p.get("stage") or ""),
        message=str(p.get("message") or ""),
        done=_int64(p.get("done")),
        total=_int64(p.get("total")),
        unit=str(p.get("unit") or ""),
        rate=_finite(p.get("rate")),
    )
    eta_s = _finite(p.get("eta_s"), None)
    if eta_s is not None and abs(eta_s) <= validate.DURATION_MAX_SECONDS:
        msg.eta.CopyFrom(_seconds_to_duration(eta_s))
    time_s = _finite(p.get("time"), None)
    if time_s is not None and (
        validate.TIMESTAMP_MIN_SECONDS <= time_s <= validate.TIMESTAMP_MAX_SECONDS
    ):
        msg.update_time.FromNanoseconds(int(time_s * 1e9))
    return msg


def error_to_proto(e: Mapping[str, Any] | None) -> job_pb2.JobError | None:
    """A stored error dict ({code, message, retryable}) as a JobError."""
    if not e:
        return None
    return job_pb2.JobError(
        code=str(e.get("code") or ""),
        message=str(e.get("message") or ""),
        retryable=bool(e.get("retryable")),
    )


#: the Job fields copied as they are
_JOB_SCALARS = ("tenant", "type", "priority", "concurrency_limit", "max_attempts", "attempt",
                "cancel_requested", "last_seq")  # fmt: skip
#: column -> (Job field, conversion) of the fields left unset when the column is empty
_JOB_OPTIONAL: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "concurrency_key": ("concurrency_key", str),
    "worker_id": ("worker_id", str),
    "request_id": ("request_id", str),
    "inputs": ("inputs", list),
    "outputs": ("outputs", list),
    "labels": ("labels", dict),
    "worker_selector": ("worker_selector", dict),
    "min_start_interval_ms": ("min_start_interval", _ms_to_duration),
    "timeout_ms": ("timeout", _ms_to_duration),
    "progress": ("progress", progress_to_proto),
    "error": ("error", error_to_proto),
}
_JOB_TIMES = (("not_before", "not_before"), ("created_at", "create_time"),
              ("started_at", "start_time"), ("finished_at", "finish_time"),
              ("updated_at", "update_time"))  # fmt: skip


def _optional_and_times(
    row: Mapping[Any, Any],
    columns: Iterable[str],
    times: tuple[tuple[str, str], ...],
    into: dict[str, Any],
) -> job_pb2.Job:
    """The Job of `into` plus the row's non-empty `columns` (`_JOB_OPTIONAL`) and its
    times as Timestamps (a row's times are often equal: each is made once)."""
    for column in columns:
        value = row[column]
        if value:
            name, convert = _JOB_OPTIONAL[column]
            into[name] = convert(value)
    made: dict[datetime, timestamp_pb2.Timestamp | None] = {}
    for column, name in times:
        dt = row[column]
        if dt is not None:
            ts = made.get(dt)
            if ts is None:
                ts = made[dt] = timestamp(dt)
            into[name] = ts
    return job_pb2.Job(**into)


def job_to_proto(row: Mapping[Any, Any]) -> job_pb2.Job:
    """A jobs row as a Job message (fields whose value is empty are left unset)."""
    kw: dict[str, Any] = {name: row[name] for name in _JOB_SCALARS}
    kw["id"] = str(row["id"])
    kw["state"] = _STATE_TO_PROTO.get(row["state"], job_pb2.JOB_STATE_UNSPECIFIED)
    if row["params"] is not None:
        kw["params"] = _struct(row["params"])
    if row["result"] is not None:
        kw["result"] = _struct(row["result"])
    return _optional_and_times(row, _JOB_OPTIONAL, _JOB_TIMES, kw)


_ASSIGNED_OPTIONAL = ("worker_id", "request_id", "inputs", "labels", "timeout_ms")
_ASSIGNED_TIMES = (("created_at", "create_time"), ("started_at", "start_time"))


def assigned_job_to_proto(row: Mapping[Any, Any]) -> job_pb2.Job:
    """A just-claimed jobs row as the Job of an Assign: what a handler sees of its job.

    Leaves out what a RUNNING attempt cannot have or the worker never reads
    (outputs, progress, result, error, the scheduling fields, times but the
    creation and start): an Assign is sent for every job, so it stays lean.
    """
    kw: dict[str, Any] = {
        "id": str(row["id"]),
        "tenant": row["tenant"],
        "type": row["type"],
        "params": _struct(row["params"]),
        "priority": row["priority"],
        "max_attempts": row["max_attempts"],
        "attempt": row["attempt"],
        "state": job_pb2.JOB_STATE_RUNNING,
        "last_seq": row["last_seq"],
    }
    return _optional_and_times(row, _ASSIGNED_OPTIONAL, _ASSIGNED_TIMES, kw)


def event_to_proto(row: Mapping[Any, Any]) -> job_pb2.JobEvent:
    """A job_events row as a JobEvent message."""
    return job_pb2.JobEvent(
        job_id=str(row["job_id"]),
        seq=row["seq"],
        kind=_EVENT_KIND_TO_PROTO.get(row["kind"], job_pb2.JOB_EVENT_KIND_UNSPECIFIED),
        state=_STATE_TO_PROTO.get(row["state"] or "", job_pb2.JOB_STATE_UNSPECIFIED),
        attempt=row["attempt"],
        progress=progress_to_proto(row["progress"]),
        error=error_to_proto(row["error"]),
        message=row["message"] or "",
        worker_id=row["worker_id"] or "",
        create_time=timestamp(row["created_at"]),
    )


def worker_to_proto(row: Mapping[Any, Any]) -> job_pb2.Worker:
    """A workers row (with running_job_ids) as a Worker message."""
    device = row["device"] or {}
    return job_pb2.Worker(
        id=row["id"],
        name=row["name"],
        labels=dict(row["labels"] or {}),
        job_types=list(row["job_types"] or ()),
        slots=row["slots"],
        device=job_pb2.Device(
            kind=str(device.get("kind", "")),
            index=int(device.get("index", 0)),
            name=str(device.get("name", "")),
            memory_bytes=int(device.get("memory_bytes", 0)),
        ),
        version=row["version"],
        connected=row["connected"],
        control_replica=row["control_replica"] or "",
        running_job_ids=list(row["running_job_ids"] or ()),
        connect_time=timestamp(row["connected_at"]),
        last_heartbeat_time=timestamp(row["last_heartbeat_at"]),
    )


def spec_from_proto(spec: job_pb2.JobSpec, prefix: str = "job") -> JobSpec:
    """A JobSpec message as the domain JobSpec.

    Checks here what only the message shows (a Struct holding NaN, a Timestamp
    or Duration out of its range, errors naming `<prefix>.<field>`); the
    service checks the rest (`control.services.jobs.validate_spec`).
    """
    not_before = validate.not_before_time(f"{prefix}.not_before", spec.not_before)
    params = (
        validate.struct(f"{prefix}.params", spec.params, max_bytes=None)
        if spec.HasField("params")
        else {}
    )
    return JobSpec(
        type=spec.type,
        params=params,
        inputs=list(spec.inputs),
        priority=spec.priority,
        labels=dict(spec.labels),
        worker_selector=dict(spec.worker_selector),
        concurrency_key=spec.concurrency_key,
        concurrency_limit=spec.concurrency_limit,
        min_start_interval_ms=validate.duration_ms(
            f"{prefix}.min_start_interval",
            spec.min_start_interval,
            max_ms=validate.MAX_MIN_START_INTERVAL_MS,
        ),
        not_before=not_before,
        timeout_ms=validate.duration_ms(
            f"{prefix}.timeout", spec.timeout, max_ms=validate.MAX_TIMEOUT_MS
        ),
        max_attempts=spec.max_attempts,
        request_id=spec.request_id,
    )


# ---------------------------------------------------------------- servicer


#: WatchProgress responses kept for reuse (recent events of the jobs being watched)
RESPONSE_CACHE_SIZE = 4096


class JobService(job_service_pb2_grpc.JobServiceServicer):
    """The client-facing job API."""

    def __init__(self, db: Database, notifier: Notifier, settings: Settings) -> None:
        self.jobs = JobsService(db, notifier, settings)
        #: WatchProgress responses of recent events, (job id, seq) -> response: an event
        #: fanned out to many watchers is converted once
        self._responses: OrderedDict[tuple[Any, int], pb.WatchProgressResponse] = OrderedDict()

    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitResponse:
        """Submit one job (idempotent on job.request_id)."""
        tenant = current_principal().tenant
        row, deduplicated = await self.jobs.submit(tenant, spec_from_proto(request.job))
        return pb.SubmitResponse(job=job_to_proto(row), deduplicated=deduplicated)

    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitBatchResponse:
        """Submit many jobs in one transaction."""
        tenant = current_principal().tenant
        if len(request.jobs) > MAX_BATCH:
            raise InvalidArgument("jobs", f"at most {MAX_BATCH} jobs per batch")
        # Claims and completions get the event loop between parts (see YIELD_EVERY).
        specs = [spec_from_proto(j, f"jobs[{i}]") async for i, j in in_turns(request.jobs)]
        rows = await self.jobs.submit_batch(tenant, specs)
        return pb.SubmitBatchResponse(jobs=[job_to_proto(r) async for _, r in in_turns(rows)])

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        """One job of the caller's tenant."""
        tenant = current_principal().tenant
        row = await self.jobs.get(tenant, parse_job_id(request.job_id))
        return pb.GetResponse(job=job_to_proto(row))

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        """A page of the caller's jobs, newest first."""
        tenant = current_principal().tenant
        states = []
        for value in request.states:
            if value not in _STATE_FROM_PROTO:
                raise InvalidArgument("states", f"unknown state {value}")
            states.append(_STATE_FROM_PROTO[value])
        rows, token = await self.jobs.list_jobs(
            tenant,
            states=states,
            job_type=request.type,
            labels=dict(request.labels),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListResponse(jobs=[job_to_proto(r) for r in rows], next_page_token=token)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        """Cancel a job (no-op when it already finished)."""
        tenant = current_principal().tenant
        row = await self.jobs.cancel(tenant, parse_job_id(request.job_id), request.reason)
        return pb.CancelResponse(job=job_to_proto(row))

    async def WatchProgress(
        self, request: pb.WatchProgressRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchProgressResponse]:
        """Stream the job's events after after_seq; ends after the terminal event."""
        tenant = current_principal().tenant
        job_id = parse_job_id(request.job_id)
        async for event in self.jobs.watch(tenant, job_id, request.after_seq):
            yield self._event_response(event)

    def _event_response(self, event: Mapping[Any, Any]) -> pb.WatchProgressResponse:
        """The response for an event, built once however many watchers receive it."""
        key = (event["job_id"], event["seq"])
        cache = self._responses
        response = cache.get(key)
        if response is None:
            response = pb.WatchProgressResponse(event=event_to_proto(event))
            cache[key] = response
            if len(cache) > RESPONSE_CACHE_SIZE:
                cache.popitem(last=False)
        return response

    async def Retry(
        self, request: pb.RetryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryResponse:
        """Requeue a failed or canceled job."""
        tenant = current_principal().tenant
        row = await self.jobs.retry(tenant, parse_job_id(request.job_id))
        return pb.RetryResponse(job=job_to_proto(row))

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        """Delete a finished job and its history."""
        tenant = current_principal().tenant
        await self.jobs.delete(tenant, parse_job_id(request.job_id))
        return pb.DeleteResponse()

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        """Counts by state and type, queue depth and age, connected workers."""
        tenant = current_principal().tenant
        stats = await self.jobs.stats(tenant)
        return pb.GetStatsResponse(
            totals=pb.StateCounts(**stats.totals),
            by_type={t: pb.StateCounts(**counts) for t, counts in stats.by_type.items()},
            queue_depth=stats.queue_depth,
            oldest_queued_age=_seconds_to_duration(stats.oldest_queued_age.total_seconds()),
            connected_workers=stats.connected_workers,
        )

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkersResponse:
        """Workers known to the control plane."""
        tenant = current_principal().tenant
        rows = await self.jobs.list_workers(tenant, request.include_disconnected)
        return pb.ListWorkersResponse(workers=[worker_to_proto(r) for r in rows])
