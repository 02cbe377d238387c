"""Submit and SubmitBatch with absurd specs: clean answers, all or nothing, nothing for a refusal.

Also the raw bytes of every method: random bytes, and valid requests with bytes
flipped, cut or appended, sent unserialized; the answer is OK or a clean
status, never INTERNAL / UNKNOWN, and whatever is refused writes nothing.
"""

from __future__ import annotations

import grpc
from fuzz_support import OK, check_error, counts, scaled, specs
from helpers import WORKER_KEY, open_channel
from hypothesis import given, settings
from hypothesis import strategies as st

from spool.v1 import (
    blob_service_pb2,
    job_pb2,
    job_service_pb2,
    worker_service_pb2,
)

pb = job_service_pb2


@settings(max_examples=scaled(60))
@given(spec=specs)
async def test_submit_absurd_specs(jobs, db, spec: job_pb2.JobSpec) -> None:
    before = await counts(db)
    try:
        response = await jobs.Submit(pb.SubmitRequest(job=spec))
    except grpc.aio.AioRpcError as err:
        check_error(err, "Submit")
        assert await counts(db) == before
        return
    got = (await jobs.Get(pb.GetRequest(job_id=response.job.id))).job
    assert got.state == job_pb2.JOB_STATE_QUEUED
    # What was stored reads back as what was asked.
    assert got.type == spec.type.strip() and dict(got.labels) == dict(spec.labels)


@settings(max_examples=scaled(25))
@given(batch=st.lists(specs, min_size=1, max_size=5))
async def test_submit_batch_is_all_or_nothing(jobs, db, batch: list[job_pb2.JobSpec]) -> None:
    before = await counts(db)
    try:
        response = await jobs.SubmitBatch(pb.SubmitBatchRequest(jobs=batch))
    except grpc.aio.AioRpcError as err:
        check_error(err, "SubmitBatch")
        assert await counts(db) == before
        return
    assert len(response.jobs) == len(batch)


SERVICES = [
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    blob_service_pb2.DESCRIPTOR.services_by_name["BlobService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
]
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]
_VALID = {
    "Submit": pb.SubmitRequest(job=job_pb2.JobSpec(type="debug.noop")),
    "SubmitBatch": pb.SubmitBatchRequest(jobs=[job_pb2.JobSpec(type="debug.noop")]),
    "Get": pb.GetRequest(job_id="00000000-0000-0000-0000-000000000000"),
    "List": pb.ListRequest(page_size=3, type="debug.noop"),
    "Cancel": pb.CancelRequest(job_id="00000000-0000-0000-0000-000000000000", reason="r"),
    "Upload": blob_service_pb2.UploadRequest(
        header=blob_service_pb2.UploadRequest.Header(sha256="0" * 64, size=1)
    ),
    "Stat": blob_service_pb2.StatRequest(uri="blob:sha256:" + "0" * 64),
    "Connect": worker_service_pb2.ConnectRequest(
        hello=worker_service_pb2.ConnectRequest.Hello(worker_id="w", job_types=["debug.noop"])
    ),
}


def _mutate(raw: bytes, position: int, byte: int, how: str) -> bytes:
    if not raw:
        return bytes([byte])
    i = position % len(raw)
    if how == "flip":
        return raw[:i] + bytes([raw[i] ^ byte or 0xFF]) + raw[i + 1 :]
    if how == "cut":
        return raw[:i]
    return raw[:i] + bytes([byte]) + raw[i:]


payloads = st.one_of(
    st.binary(max_size=80),
    st.builds(
        _mutate,
        st.sampled_from([m.SerializeToString() for m in _VALID.values()]),
        st.integers(0, 200),
        st.integers(0, 255),
        st.sampled_from(["flip", "cut", "insert"]),
    ),
)


async def _send(channel: grpc.aio.Channel, path: str, method, payload: bytes) -> None:
    kwargs = {"request_serializer": None, "response_deserializer": None}
    if method.client_streaming:

        async def requests():
            yield payload

        if method.server_streaming:
            # One message then half-close: the server answers and ends the stream.
            async for _ in channel.stream_stream(path, **kwargs)(requests(), timeout=10):
                pass
        else:
            await channel.stream_unary(path, **kwargs)(requests(), timeout=10)
    elif method.server_streaming:
        call = channel.unary_stream(path, **kwargs)(payload, timeout=10)
        await call.read()  # a watch of a live job would go on: the first message is enough
        call.cancel()
    else:
        await channel.unary_unary(path, **kwargs)(payload, timeout=10)


@settings(max_examples=scaled(80))
@given(index=st.integers(0, len(METHODS) - 1), payload=payloads)
async def test_raw_bytes_on_every_method(control, channel, db, index: int, payload: bytes) -> None:
    path, method = METHODS[index]
    before = await counts(db)
    async with open_channel(control.address, WORKER_KEY) as worker_channel:
        ch = worker_channel if "WorkerService" in path else channel
        try:
            await _send(ch, path, method, payload)
            code = OK
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
                code = err.code()  # a valid watch/download/connect waiting for more
            else:
                code = check_error(err, f"{path} {payload!r}")
    if code != OK and "Connect" not in path:
        assert await counts(db) == before, (path, payload, code)
