"""Every rejected request: its exact status code, the field named, and nothing written."""

from __future__ import annotations

import grpc
import pytest
from control_support import count_rows, submit
from google.protobuf import duration_pb2, struct_pb2
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


async def test_list_arguments(jobs) -> None:
    for request, field in [
        (pb.ListRequest(page_size=-1), "page_size"),
        (pb.ListRequest(page_token="%%%not-base64"), "page_token"),
        (pb.ListRequest(page_token="eyJ4IjogMX0"), "page_token"),  # {"x": 1}
        (pb.ListRequest(states=[S.JOB_STATE_UNSPECIFIED]), "states"),
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
