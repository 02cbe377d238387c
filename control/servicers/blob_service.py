"""spool.v1.BlobService: protobuf in and out; the decisions live in control.services.blobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from control.blobstore import blob_uri
from control.errors import InvalidArgument, SpoolError
from control.services.blobs import Blobs, UploadHeader, sha_of
from spool.v1 import blob_service_pb2, blob_service_pb2_grpc

#: a failing upload reads at most this much more of the client's stream
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_S = 2.0


def blob_message(row: Any) -> blob_service_pb2.Blob:
    """A blobs row as the protobuf Blob."""
    created = Timestamp()
    created.FromDatetime(row["created_at"])
    return blob_service_pb2.Blob(
        uri=blob_uri(row["sha256"]),
        sha256=row["sha256"],
        size=int(row["size"]),
        content_type=row["content_type"],
        filename=row["filename"],
        create_time=created,
    )


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read (and drop) what the client is still sending before ending its upload early.

    grpc.aio clients that are still writing when the server ends the call may
    report INTERNAL instead of the server's status; letting a small upload
    finish sending first delivers the real reason. Bounded in bytes and time.
    """
    received = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_MAX_S):
            async for msg in requests:
                received += len(msg.chunk)
                if received > DRAIN_MAX_BYTES:
                    return


class BlobService(blob_service_pb2_grpc.BlobServiceServicer):
    """Upload (client stream), Download (server stream), Stat."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs

    async def Upload(
        self,
        request_iterator: AsyncIterator[blob_service_pb2.UploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> blob_service_pb2.UploadResponse:
        """First message: Header; then chunks of at most 1 MiB."""
        tenant = await self.blobs.tenant_for(context.invocation_metadata())
        first = None
        async for msg in request_iterator:
            first = msg
            break
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidArgument("header", "the first message must carry the header")
        h = first.header
        header = UploadHeader(
            sha256=h.sha256,
            size=h.size,
            content_type=h.content_type,
            filename=h.filename,
            offset=h.offset,
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for msg in request_iterator:
                if msg.WhichOneof("message") != "chunk":
                    raise InvalidArgument("header", "only the first message may carry a header")
                yield msg.chunk

        try:
            row = await self.blobs.upload(tenant, header, chunks())
        except SpoolError:
            await _drain(request_iterator)
            raise
        # Content the tenant already had is answered without reading the chunks.
        await _drain(request_iterator)
        return blob_service_pb2.UploadResponse(blob=blob_message(row))

    async def Download(
        self, request: blob_service_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[blob_service_pb2.DownloadResponse]:
        """The blob (or offset/length of it) in 1 MiB chunks; the first message carries Blob."""
        access = await self.blobs.access_for(context.invocation_metadata())
        sha = sha_of(request.uri)
        access.check_read(sha)
        row, chunks = await self.blobs.open_download(
            access.tenant, sha, request.offset, request.length
        )
        blob = blob_message(row)
        first = True
        async with aclosing(chunks) as stream:
            async for offset, data in stream:
                yield blob_service_pb2.DownloadResponse(
                    chunk=data, offset=offset, blob=blob if first else None
                )
                first = False
        if first:
            # An empty blob or range: one message so the caller still gets the Blob.
            yield blob_service_pb2.DownloadResponse(offset=request.offset, blob=blob)

    async def Stat(
        self, request: blob_service_pb2.StatRequest, context: grpc.aio.ServicerContext
    ) -> blob_service_pb2.StatResponse:
        """The blob, whether it is complete, and how many bytes of it arrived."""
        tenant = await self.blobs.tenant_for(context.invocation_metadata())
        row, received = await self.blobs.stat(tenant, sha_of(request.uri))
        return blob_service_pb2.StatResponse(
            blob=blob_message(row), complete=bool(row["complete"]), uploaded_bytes=received
        )
