"""Every rejected request: its exact status code, the field named, and nothing written."""

from __future__ import annotations

import base64
import json
import math
import time

import grpc
import pytest
from control_support import count_rows, submit
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from spool.v1 import job_pb2, job_service_pb2

pb = job_service_pb2
S = job_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MISSING = "00000000-0000-0000-0000-000000000000"


def _big_params() -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"blob": "x" * (1024 * 1024 + 1)})
    return s


def _negative() -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=-1)


def _params(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _at(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


_YEAR_S = 365 * 86400

BAD_SUBMITS = [
    (S.JobSpec(type=""), "job.type"),
    (S.JobSpec(type="   "), "job.type"),
    (S.JobSpec(type="t", priority=101), "job.priority"),
    (S.JobSpec(type="t", priority=-101), "job.priority"),
    (S.JobSpec(type="t", params=_big_params()), "job.params"),
    (S.JobSpec(type="t", max_attempts=-1), "job.max_attempts"),
    (S.JobSpec(type="t", timeout=_negative()), "job.timeout"),
    (S.JobSpec(type="t", min_start_interval=_negative()), "job.min_start_interval"),
    (S.JobSpec(type="t", concurrency_limit=-2), "job.concurrency_limit"),
    (S.JobSpec(type="t", inputs=["ftp://x"]), "job.inputs[0]"),
    (S.JobSpec(type="t", labels={"": "v"}), "job.labels"),
    # issue 8, hole 4: values Postgres cannot store were INTERNAL
    (S.JobSpec(type="t\x00"), "job.type"),
    (S.JobSpec(type="t", labels={"k\x00": "v"}), "job.labels"),
    (S.JobSpec(type="t", labels={"k": "v\x00"}), "job.labels[k]"),
    (S.JobSpec(type="t", worker_selector={"k": "\x00"}), "job.worker_selector[k]"),
    (S.JobSpec(type="t", request_id="r\x00"), "job.request_id"),
    (S.JobSpec(type="t", concurrency_key="\x00"), "job.concurrency_key"),
    (S.JobSpec(type="t", inputs=["https://x/\x00"]), "job.inputs[0]"),
    (S.JobSpec(type="t", params=_params(loss=math.nan)), "job.params.loss"),
    (S.JobSpec(type="t", params=_params(a=[1, math.inf])), "job.params.a[1]"),
    (S.JobSpec(type="t", params=_params(a={"b": -math.inf})), "job.params.a.b"),
    (S.JobSpec(type="t", params=_params(a="x\x00")), "job.params.a"),
    (S.JobSpec(type="t", params=_params(**{"k\x00": 1})), "job.params"),
    (S.JobSpec(type="t", not_before=_at(10**12)), "job.not_before"),
    (S.JobSpec(type="t", not_before=_at(-(10**12))), "job.not_before"),
    (S.JobSpec(type="t", not_before=_at(0, nanos=-1)), "job.not_before"),
    (S.JobSpec(type="t", not_before=_at(int(time.time()) + 2 * _YEAR_S)), "job.not_before"),
    # issue 8, hole 1: a valid Duration that overflowed the claim's timestamp arithmetic
    (S.JobSpec(type="t", timeout=duration_pb2.Duration(seconds=300000000000)), "job.timeout"),
    (S.JobSpec(type="t", timeout=duration_pb2.Duration(seconds=8 * 86400)), "job.timeout"),
    (
        S.JobSpec(type="t", min_start_interval=duration_pb2.Duration(seconds=10**11)),
        "job.min_start_interval",
    ),
    (S.JobSpec(type="t", timeout=duration_pb2.Duration(seconds=1, nanos=-5)), "job.timeout"),
]


def field_of(err: grpc.aio.AioRpcError) -> str:
    """The field named in the BadRequest details of an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError("no BadRequest detail")


@pytest.mark.parametrize(("spec", "field"), BAD_SUBMITS, ids=[f for _, f in BAD_SUBMITS])
async def test_bad_submit_names_the_field_and_writes_nothing(jobs, db, spec, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.Submit(pb.SubmitRequest(job=spec))
    assert err.value.code() == INVALID
    assert field_of(err.value) == field
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="ok"), spec]))
    assert err.value.code() == INVALID
    assert field_of(err.value) == field.replace("job.", "jobs[1].")
    assert await count_rows(db) == 0
    assert await count_rows(db, "job_events") == 0


async def test_malformed_job_ids_are_invalid_arguments(jobs, db) -> None:
    await submit(jobs)
    calls = [
        lambda: jobs.Get(pb.GetRequest(job_id="not-a-uuid")),
        lambda: jobs.Cancel(pb.CancelRequest(job_id="")),
        lambda: jobs.Retry(pb.RetryRequest(job_id="1234")),
        lambda: jobs.Delete(pb.DeleteRequest(job_id="x" * 36)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == INVALID
        assert field_of(err.value) == "job_id"
    for call in [
        lambda: jobs.Get(pb.GetRequest(job_id=MISSING)),
        lambda: jobs.Cancel(pb.CancelRequest(job_id=MISSING)),
        lambda: jobs.Retry(pb.RetryRequest(job_id=MISSING)),
        lambda: jobs.Delete(pb.DeleteRequest(job_id=MISSING)),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await count_rows(db) == 1


def _token(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_list_arguments(jobs) -> None:
    for request, field in [
        (pb.ListRequest(page_size=-1), "page_size"),
        (pb.ListRequest(page_token="%%%not-base64"), "page_token"),
        (pb.ListRequest(page_token="eyJ4IjogMX0"), "page_token"),  # {"x": 1}
        (pb.ListRequest(states=[S.JOB_STATE_UNSPECIFIED]), "states"),
        # issue 8, hole 4: these were INTERNAL
        (
            pb.ListRequest(page_token=_token({"c": "2026-01-01T00:00:00+00:00", "i": 5})),
            "page_token",
        ),
        (pb.ListRequest(page_token=_token({"c": 5, "i": MISSING})), "page_token"),
        (pb.ListRequest(page_token=_token([1, 2])), "page_token"),
        (pb.ListRequest(page_token="\x00"), "page_token"),
        (pb.ListRequest(type="t\x00"), "type"),
        (pb.ListRequest(labels={"k\x00": "v"}), "labels"),
        (pb.ListRequest(labels={"k": "v\x00"}), "labels[k]"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.List(request)
        assert err.value.code() == INVALID
        assert field_of(err.value) == field
    await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=[S.JobSpec(type="t")] * 60))
    assert len((await jobs.List(pb.ListRequest())).jobs) == 50  # the default page
    assert len((await jobs.List(pb.ListRequest(page_size=5000))).jobs) == 60  # capped at 1000


async def test_duplicate_request_ids_within_a_batch(jobs, db) -> None:
    specs = [S.JobSpec(type="t", request_id="a"), S.JobSpec(type="t", request_id="a")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=specs))
    assert field_of(err.value) == "jobs[1].request_id"
    assert await count_rows(db) == 0


async def test_cancel_reason_is_checked_and_nothing_changes(jobs, db) -> None:
    job = await submit(jobs)
    for reason in ["stop\x00", "x" * 1001]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.Cancel(pb.CancelRequest(job_id=job.id, reason=reason))
        assert err.value.code() == INVALID
        assert field_of(err.value) == "reason"
    assert (await jobs.Get(pb.GetRequest(job_id=job.id))).job.state == S.JOB_STATE_QUEUED
    assert await count_rows(db, "job_events") == 1  # the submit's


async def test_limits_themselves_are_accepted(jobs) -> None:
    """The documented maxima are inclusive: 7 d timeout, 1 d interval, not_before ~1 y ahead."""
    spec = S.JobSpec(
        type="t",
        timeout=duration_pb2.Duration(seconds=7 * 86400),
        min_start_interval=duration_pb2.Duration(seconds=86400),
        not_before=_at(int(time.time()) + _YEAR_S - 3600),
        params=_params(big=1e308, small=-1e-300, text="héllo ✓ \u202e", nested={"a": [[]]}),
        labels={"k" * 128: "v" * 256},
    )
    job = (await jobs.Submit(pb.SubmitRequest(job=spec))).job
    got = (await jobs.Get(pb.GetRequest(job_id=job.id))).job
    assert got.timeout.seconds == 7 * 86400
    assert got.params["text"] == "héllo ✓ \u202e"
    old = (
        await jobs.Submit(pb.SubmitRequest(job=S.JobSpec(type="t", not_before=_at(-62135596800))))
    ).job
    assert old.not_before.seconds == -62135596800  # year 1: "now", accepted
