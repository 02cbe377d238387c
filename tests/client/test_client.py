"""The Python client against a real control plane (and a real worker where jobs must run)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import TENANT_A_KEY, TENANT_B_KEY, WORKER_KEY, open_channel, running_control_plane

from spool.client import AsyncClient, Client, errors, state_name
from spool.v1 import blob_service_pb2, blob_service_pb2_grpc, job_pb2

pytestmark = pytest.mark.timeout(60)


async def test_submit_get_list_and_errors(client: AsyncClient) -> None:
    job = await client.submit(
        "debug.sleep", {"duration": 1, "echo": "hi"}, priority=5, labels={"team": "a"}
    )
    assert job.state == job_pb2.JOB_STATE_QUEUED
    assert job.request_id  # generated, so a retried Submit is safe
    got = await client.get(job.id)
    assert (got.id, got.priority, got.labels["team"]) == (job.id, 5, "a")
    assert got.params["echo"] == "hi"

    with pytest.raises(errors.InvalidArgument) as bad:
        await client.submit("debug.sleep", priority=1000)
    assert bad.value.field == "job.priority"
    with pytest.raises(errors.NotFound):
        await client.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(errors.InvalidArgument) as bad_id:
        await client.get("not-a-uuid")
    assert bad_id.value.field == "job_id"
    with pytest.raises(errors.InvalidArgument) as missing:
        await client.submit("debug.sleep", inputs=["/no/such/file.mp4"])
    assert missing.value.field == "inputs[0]"


async def test_request_id_deduplicates(client: AsyncClient) -> None:
    first = await client.submit("debug.noop", request_id="order-42")
    again = await client.submit("debug.noop", request_id="order-42")
    assert again.id == first.id


async def test_list_pages_lazily_and_filters(client: AsyncClient) -> None:
    jobs = await client.submit_batch(
        [{"type": "debug.noop", "labels": {"n": str(i)}} for i in range(5)]
    )
    other = await client.submit("debug.sleep")
    listed = [j.id async for j in client.list(type="debug.noop", page_size=2)]
    # one batch shares a create time, so compare as sets: all 5, no repeats, across 3 pages
    assert sorted(listed) == sorted(j.id for j in jobs)
    assert [j.id async for j in client.list(type="debug.noop", limit=3)] == listed[:3]
    assert [j.id async for j in client.list(states=["queued"], labels={"n": "1"})] == [jobs[1].id]
    assert other.id in [j.id async for j in client.list(type="debug.sleep")]
    with pytest.raises(errors.InvalidArgument):
        [j async for j in client.list(states=["sleeping"])]


async def test_cancel_retry_delete_stats(client: AsyncClient) -> None:
    job = await client.submit("debug.sleep")
    with pytest.raises(errors.FailedPrecondition):
        await client.delete(job.id)
    canceled = await client.cancel(job.id, reason="test")
    assert state_name(canceled.state) == "canceled"
    stats = await client.stats()
    assert stats.totals.canceled == 1
    assert stats.by_type["debug.sleep"].canceled == 1
    again = await client.retry(job.id)
    assert again.state == job_pb2.JOB_STATE_QUEUED
    await client.cancel(job.id)
    await client.delete(job.id)
    with pytest.raises(errors.NotFound):
        await client.get(job.id)
    assert await client.workers() == []


async def test_auth_errors(cp: Any) -> None:
    async with AsyncClient(cp.address, token="wrong") as c:
        with pytest.raises(errors.Unauthenticated):
            await c.stats()
    async with AsyncClient(cp.address, token=WORKER_KEY) as c:
        with pytest.raises(errors.PermissionDenied):
            await c.stats()
    async with AsyncClient(cp.address, token=TENANT_A_KEY) as a:
        job = await a.submit("debug.noop")
    async with AsyncClient(cp.address, token=TENANT_B_KEY) as b:
        with pytest.raises(errors.NotFound):
            await b.get(job.id)


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", retry_budget=0.3, timeout=2) as c:
        with pytest.raises(errors.Unavailable):
            await c.stats()


async def test_sync_client_inside_a_running_loop(cp: Any) -> None:
    def script() -> list[str]:
        with Client(cp.address, token=TENANT_A_KEY) as c:
            job = c.submit("debug.noop", {"x": 1})
            assert c.get(job.id).id == job.id
            events = c.watch(job.id)  # no worker: the job stays QUEUED, the watch open
            assert next(events).state == job_pb2.JOB_STATE_QUEUED
            events.close()  # leaving early closes the stream
            return [j.id for j in c.list(page_size=1)]

    ids = await asyncio.to_thread(script)
    assert len(ids) == 1


async def test_upload_watch_wait_download(client: AsyncClient, worker: Any, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: two upload chunks
    src = tmp_path / "input.bin"
    src.write_bytes(data)
    job = await client.submit("client.reverse", {"name": "out.bin"}, inputs=[src])
    sha = hashlib.sha256(data).hexdigest()
    assert list(job.inputs) == [f"blob:sha256:{sha}"]
    assert await client.upload(src) == job.inputs[0]  # already stored: not sent again

    events = [e async for e in client.watch(job.id)]
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    assert any(e.kind == job_pb2.JOB_EVENT_KIND_PROGRESS for e in events)

    done = await client.wait(job.id, timeout=5)
    assert done.result["bytes"] == len(data)
    paths = await client.download(job.id, tmp_path / "out")
    assert [p.name for p in paths] == ["out.bin"]
    assert paths[0].read_bytes() == data[::-1]


async def test_wait_times_out(client: AsyncClient) -> None:
    job = await client.submit("debug.sleep")  # no worker: stays QUEUED
    with pytest.raises(errors.WaitTimeout):
        await client.wait(job.id, timeout=0.3)


async def test_upload_resumes_a_partial_upload(
    cp: Any, client: AsyncClient, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 6000  # 1.5 MB
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    uri = f"blob:sha256:{sha}"
    first_chunk = data[: 1024 * 1024]

    # Break an upload after its first chunk (the stream ends early).
    async def broken() -> Any:
        header = blob_service_pb2.UploadRequest.Header(
            sha256=sha, size=len(data), filename="big.bin"
        )
        yield blob_service_pb2.UploadRequest(header=header)
        yield blob_service_pb2.UploadRequest(chunk=first_chunk)

    async with open_channel(cp.address, TENANT_A_KEY) as channel:
        blobs = blob_service_pb2_grpc.BlobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await blobs.Upload(broken())
        assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        st = await blobs.Stat(blob_service_pb2.StatRequest(uri=uri))
        assert (st.complete, st.uploaded_bytes) == (False, len(first_chunk))

        assert await client.upload(src) == uri  # resumes at the offset the server holds
        st = await blobs.Stat(blob_service_pb2.StatRequest(uri=uri))
        assert st.complete and st.blob.size == len(data)
    job = await client.submit("debug.noop", inputs=[uri])
    assert list(job.inputs) == [uri]


async def test_submit_retries_while_the_control_plane_restarts(database_url: str) -> None:
    async with running_control_plane(database_url) as cp:
        address, port = cp.address, cp.port
    async with AsyncClient(address, token=TENANT_A_KEY, retry_budget=20.0) as c:
        submitting = asyncio.create_task(c.submit("debug.noop", request_id="while-down"))
        await asyncio.sleep(0.3)  # the first tries meet a closed port
        assert not submitting.done()
        async with running_control_plane(database_url, listen=f"127.0.0.1:{port}"):
            job = await asyncio.wait_for(submitting, timeout=20)
            assert [j.id async for j in c.list()] == [job.id]  # exactly one job
