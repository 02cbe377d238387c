"""Issue 8, hole 4: unparsable request bytes are INVALID_ARGUMENT on every method.

Before, grpc.aio answered a unary request with UNKNOWN and the parser's class
name ("Unexpected <class 'google.protobuf.message.DecodeError'>: …"), and a
streamed one (Upload, Connect) with INTERNAL.
"""

from __future__ import annotations

import grpc
import pytest
from control_support import count_rows
from helpers import WORKER_KEY, open_channel

from spool.v1 import blob_service_pb2, job_service_pb2, worker_service_pb2

#: not a protobuf: a field number 0 / bad wire type
GARBAGE = b"\xff\xff\xff\xff"
#: field 1 holding invalid UTF-8 (malformed where field 1 is a string)
BAD_UTF8 = b"\x0a\x02\xff\xfe"
#: a length-delimited field claiming more bytes than there are
TRUNCATED = b"\x0a\x7f" + b"a"

SERVICES = [
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    blob_service_pb2.DESCRIPTOR.services_by_name["BlobService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
]
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]


async def call_raw(channel: grpc.aio.Channel, path: str, method, payload: bytes) -> None:
    """Send `payload` as the (first) request message of `method`, unserialized."""
    kwargs = {"request_serializer": None, "response_deserializer": None}
    if method.client_streaming:

        async def requests():
            yield payload

        if method.server_streaming:
            call = channel.stream_stream(path, **kwargs)(requests())
            async for _ in call:
                pass
        else:
            await channel.stream_unary(path, **kwargs)(requests())
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **kwargs)(payload):
            pass
    else:
        await channel.unary_unary(path, **kwargs)(payload)


@pytest.mark.parametrize(("path", "method"), METHODS, ids=[p for p, _ in METHODS])
async def test_malformed_bytes_are_invalid_argument(control, channel, db, path, method) -> None:
    async with open_channel(control.address, WORKER_KEY) as worker_channel:
        ch = worker_channel if "WorkerService" in path else channel
        first = method.input_type.fields_by_number.get(1)
        string_first = first is not None and first.type == first.TYPE_STRING
        for payload in (GARBAGE, TRUNCATED, *([BAD_UTF8] if string_first else [])):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(ch, path, method, payload)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                payload,
                err.value.code(),
                err.value.details(),
            )
            details = err.value.details() or ""
            assert details.startswith("request: not a valid spool.v1."), details
            assert "Error" not in details and "class" not in details
    # Still serving, nothing written.
    stats = await channel.unary_unary(
        "/spool.v1.JobService/GetStats",
        request_serializer=job_service_pb2.GetStatsRequest.SerializeToString,
        response_deserializer=job_service_pb2.GetStatsResponse.FromString,
    )(job_service_pb2.GetStatsRequest())
    assert stats.totals.queued == 0
    assert await count_rows(db) == 0 and await count_rows(db, "workers") == 0


async def test_malformed_message_later_in_an_upload(channel, db) -> None:
    """A good header, then bytes that are no UploadRequest: INVALID_ARGUMENT, nothing kept."""
    header = blob_service_pb2.UploadRequest(
        header=blob_service_pb2.UploadRequest.Header(sha256="0" * 64, size=10)
    ).SerializeToString()

    async def requests():
        yield header
        yield GARBAGE

    call = channel.stream_unary(
        "/spool.v1.BlobService/Upload", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(requests())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await count_rows(db, "blobs") == 0
