"""BlobService on a real control plane (Postgres, grpc.aio), and worker.fetch against it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from helpers import TENANT_A_KEY, TENANT_B_KEY, WORKER_KEY, running_control_plane, wait_until

from control.services.blobs import BlobCollector, Blobs
from control.store import blobs as blob_store
from spool.v1 import blob_service_pb2 as pb
from spool.v1 import blob_service_pb2_grpc
from worker.fetch import BlobClient, fetch_input, upload_output
from worker.sdk import PermanentError, RetryableError

MiB = 1024 * 1024
QUOTA = 6 * MiB


@pytest.fixture
async def cp(database_url: str, tmp_path: Path):
    """A control plane with its blob dir in tmp_path and a 6 MiB per-tenant quota."""
    async with running_control_plane(
        database_url, blob_dir=str(tmp_path / "blobs"), blob_quota_bytes=QUOTA
    ) as plane:
        yield plane


@pytest.fixture
async def chan(cp):
    async with grpc.aio.insecure_channel(cp.address) as ch:
        yield ch


def _md(key: str, job_id: str | None = None) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {key}")]
    if job_id:
        md.append(("spool-job-id", job_id))
    return md


def _blobs(cp) -> Blobs:
    return next(c for c in cp.components if isinstance(c, BlobCollector)).blobs


def _requests(data: bytes, *, sha: str | None = None, offset: int = 0, chunk: int = MiB, **kw):
    header = pb.UploadRequest.Header(
        sha256=sha or hashlib.sha256(data).hexdigest(), size=len(data), offset=offset, **kw
    )
    reqs = [pb.UploadRequest(header=header)]
    reqs += [pb.UploadRequest(chunk=data[i : i + chunk]) for i in range(offset, len(data), chunk)]
    return reqs


async def _upload(stub, key: str, data: bytes, **kw) -> pb.UploadResponse:
    return await stub.Upload(iter(_requests(data, **kw)), metadata=_md(key))


async def _download(stub, key: str, uri: str, offset: int = 0, length: int = 0):
    msgs = [
        m
        async for m in stub.Download(
            pb.DownloadRequest(uri=uri, offset=offset, length=length), metadata=_md(key)
        )
    ]
    return msgs, b"".join(m.chunk for m in msgs)


async def _received(stub, uri: str, n: int) -> bool:
    """True once Stat says `n` bytes of the upload arrived (NOT_FOUND before the header)."""
    try:
        st = await stub.Stat(pb.StatRequest(uri=uri), metadata=_md(TENANT_A_KEY))
    except grpc.aio.AioRpcError:
        return False
    return st.uploaded_bytes == n


def _objects(cp_dir: Path) -> list[Path]:
    return [p for p in (cp_dir / "objects").rglob("*") if p.is_file()]


def _partials(cp_dir: Path) -> list[Path]:
    return [p for p in (cp_dir / "partial").rglob("*") if p.is_file()]


async def test_round_trip_with_ranges_and_dedup(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(2 * MiB + 12345)
    sha = hashlib.sha256(data).hexdigest()
    resp = await _upload(stub, TENANT_A_KEY, data, filename="clip.mp4", content_type="video/mp4")
    assert resp.blob.uri == f"blob:sha256:{sha}" and resp.blob.size == len(data)
    assert resp.blob.filename == "clip.mp4" and resp.blob.content_type == "video/mp4"
    st = await stub.Stat(pb.StatRequest(uri=resp.blob.uri), metadata=_md(TENANT_A_KEY))
    assert st.complete and st.uploaded_bytes == len(data)

    msgs, got = await _download(stub, TENANT_A_KEY, resp.blob.uri)
    assert got == data
    assert msgs[0].blob.sha256 == sha and not msgs[1].HasField("blob")
    assert all(len(m.chunk) <= MiB for m in msgs)
    assert [m.offset for m in msgs] == [0, MiB, 2 * MiB]

    msgs, got = await _download(stub, TENANT_A_KEY, resp.blob.uri, offset=1000, length=MiB + 7)
    assert got == data[1000 : 1000 + MiB + 7] and msgs[0].offset == 1000
    _, tail = await _download(stub, TENANT_A_KEY, resp.blob.uri, offset=len(data) - 5)
    assert tail == data[-5:]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _download(stub, TENANT_A_KEY, resp.blob.uri, offset=len(data) + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in err.value.details()

    # The same content from another tenant is stored once on disk, readable by both.
    again = await _upload(stub, TENANT_B_KEY, data)
    assert again.blob.uri == resp.blob.uri
    assert len(_objects(tmp_path / "blobs")) == 1 and not _partials(tmp_path / "blobs")
    _, got_b = await _download(stub, TENANT_B_KEY, resp.blob.uri)
    assert got_b == data
    # Uploading what the tenant already has returns at once.
    assert (await _upload(stub, TENANT_A_KEY, data)).blob.uri == resp.blob.uri


async def test_broken_upload_resumes_to_same_sha(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(3 * MiB + 999)
    sha = hashlib.sha256(data).hexdigest()
    uri = f"blob:sha256:{sha}"
    reqs = _requests(data)
    call = stub.Upload(metadata=_md(TENANT_A_KEY))
    for req in reqs[:3]:  # header + 2 MiB, then the client goes away
        await call.write(req)

    await wait_until(lambda: _received(stub, uri, 2 * MiB), timeout=10)
    call.cancel()
    st = await stub.Stat(pb.StatRequest(uri=uri), metadata=_md(TENANT_A_KEY))
    assert not st.complete and st.uploaded_bytes == 2 * MiB
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(stub, TENANT_A_KEY, data, offset=MiB)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"expected offset {2 * MiB}" in err.value.details()

    resp = await _upload(stub, TENANT_A_KEY, data, offset=st.uploaded_bytes)
    assert resp.blob.sha256 == sha
    _, got = await _download(stub, TENANT_A_KEY, uri)
    assert hashlib.sha256(got).hexdigest() == sha
    assert not _partials(tmp_path / "blobs")


async def test_stream_ending_early_is_resumable(cp, chan) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(MiB + 10)
    reqs = _requests(data)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Upload(iter(reqs[:2]), metadata=_md(TENANT_A_KEY))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"header.offset={MiB}" in err.value.details()
    resp = await _upload(stub, TENANT_A_KEY, data, offset=MiB)
    assert resp.blob.size == len(data)


async def test_quota_refuses_before_writing(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    await _upload(stub, TENANT_A_KEY, os.urandom(4 * MiB))
    big = os.urandom(3 * MiB)
    for data in (big, os.urandom(QUOTA + 1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _upload(stub, TENANT_A_KEY, data)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            uri = f"blob:sha256:{hashlib.sha256(data).hexdigest()}"
            await stub.Stat(pb.StatRequest(uri=uri), metadata=_md(TENANT_A_KEY))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not _partials(tmp_path / "blobs") and len(_objects(tmp_path / "blobs")) == 1
    # Another tenant has its own quota.
    await _upload(stub, TENANT_B_KEY, big)


async def test_bad_sha_and_bad_messages_store_nothing(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(MiB + 5)

    async def fails(reqs, code, field) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(iter(reqs), metadata=_md(TENANT_A_KEY))
        assert err.value.code() == code, err.value.details()
        assert field in err.value.details()

    wrong = hashlib.sha256(b"other").hexdigest()
    await fails(_requests(data, sha=wrong), grpc.StatusCode.INVALID_ARGUMENT, "header.sha256")
    await fails(_requests(data, chunk=MiB + 1), grpc.StatusCode.INVALID_ARGUMENT, "chunk")
    await fails(_requests(data, sha="xyz"), grpc.StatusCode.INVALID_ARGUMENT, "header.sha256")
    await fails(_requests(data)[1:], grpc.StatusCode.INVALID_ARGUMENT, "header")
    too_long = [*_requests(b"abc"), pb.UploadRequest(chunk=b"d")]
    await fails(too_long, grpc.StatusCode.INVALID_ARGUMENT, "chunk")
    twice = _requests(data)
    await fails([*twice[:2], twice[0]], grpc.StatusCode.INVALID_ARGUMENT, "header")
    for bad_uri in ("blob:sha256:123", "https://x/y", ""):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Stat(pb.StatRequest(uri=bad_uri), metadata=_md(TENANT_A_KEY))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with cp.db.session() as s:
        n = (await s.execute(sa.text("SELECT count(*) FROM blobs WHERE complete"))).scalar_one()
    assert n == 0 and not _objects(tmp_path / "blobs")


async def test_odd_header_values_are_invalid_and_store_nothing(cp, chan, tmp_path: Path) -> None:
    """Issue 8, hole 4: NUL in a name was INTERNAL; a sha256 with a newline was accepted."""
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = b"some bytes"
    sha = hashlib.sha256(data).hexdigest()
    for kw, field in [
        ({"filename": "a\x00b"}, "header.filename"),
        ({"content_type": "text/plain\x00"}, "header.content_type"),
        ({"filename": "x" * 1025}, "header.filename"),
        ({"sha": sha + "\n"}, "header.sha256"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _upload(stub, TENANT_A_KEY, data, **kw)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(field)
    for uri in (f"blob:sha256:{sha}\n", "blob:sha256:" + "0" * 10_000, "blob:\x00"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Stat(pb.StatRequest(uri=uri), metadata=_md(TENANT_A_KEY))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _download(stub, TENANT_A_KEY, uri)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with cp.db.session() as s:
        n = (await s.execute(sa.text("SELECT count(*) FROM blobs"))).scalar_one()
    assert n == 0 and not _objects(tmp_path / "blobs")


async def test_tenant_isolation(cp, chan) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    resp = await _upload(stub, TENANT_A_KEY, b"acme secret")
    for call in (
        stub.Stat(pb.StatRequest(uri=resp.blob.uri), metadata=_md(TENANT_B_KEY)),
        _download(stub, TENANT_B_KEY, resp.blob.uri),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


#: the worker id the blob tests act as (registered to WORKER_KEY, tenant acme)
WORKER_ID = "blob-test-worker"


async def _job(cp, tenant: str, state: str, inputs: list[str], worker_id: str = WORKER_ID) -> str:
    """Insert a job row in `state`, attempt 1 held by `worker_id` (the worker stream is not
    under test here), and register that worker id to WORKER_KEY's tenant/role."""
    job_id = uuid.uuid4()
    async with cp.db.session() as s, s.begin():
        await s.execute(
            sa.text(
                "INSERT INTO workers (id, owner, tenant) VALUES (:w, 'acme/worker', 'acme') "
                "ON CONFLICT (id) DO NOTHING"
            ),
            {"w": worker_id},
        )
        await s.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant, type, inputs, max_attempts, state, attempt, "
                "worker_id) VALUES (:id, :tenant, 'model.infer', CAST(:inputs AS jsonb), 1, "
                ":state, 1, :w)"
            ),
            {
                "id": job_id,
                "tenant": tenant,
                "inputs": json.dumps(inputs),
                "state": state,
                "w": worker_id,
            },
        )
    return str(job_id)


async def test_worker_fetch_and_upload_for_a_running_job(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(2 * MiB + 3)
    uri = (await _upload(stub, TENANT_A_KEY, data, filename="in.bin")).blob.uri
    job_id = await _job(cp, "acme", "running", [uri])
    queued = await _job(cp, "acme", "queued", [uri])
    calls: list[dict] = []

    def worker_side() -> tuple[Path, str]:
        with BlobClient.connect(cp.address, token=WORKER_KEY, worker_id=WORKER_ID) as client:
            job_client = client.for_job(job_id, 1)
            path = fetch_input(
                uri,
                tmp_path / "in",
                blob_client=job_client,
                on_progress=lambda **kw: calls.append(kw),
            )
            out = tmp_path / "result.npy"
            out.write_bytes(b"result bytes" * 1000)
            out_uri = upload_output(out, blob_client=client, job_id=job_id, attempt=1)
            # Without a job, or for a job that is not running: refused.
            for bad in (client, client.for_job(queued, 1)):
                try:
                    fetch_input(uri, tmp_path / "x", blob_client=bad, max_retries=0)
                except RetryableError as exc:
                    calls.append({"error": exc})
            return path, out_uri

    path, out_uri = await asyncio.to_thread(worker_side)
    assert path.name == "in.bin" and path.read_bytes() == data
    progress = [c for c in calls if "done" in c]
    assert progress[-1]["done"] == progress[-1]["total"] == len(data)
    errors = [c["error"] for c in calls if "error" in c]
    assert len(errors) == 2
    # The output landed in the job's tenant.
    msgs, got = await _download(stub, TENANT_A_KEY, out_uri)
    assert got == b"result bytes" * 1000 and msgs[0].blob.filename == "result.npy"
    with pytest.raises(grpc.aio.AioRpcError):
        await _download(stub, TENANT_B_KEY, out_uri)


async def test_a_worker_reads_only_the_inputs_of_the_attempt_it_holds(cp, chan) -> None:
    """A worker key cannot read another tenant's blobs, nor blobs that are not inputs of
    the attempt it holds, nor act for another worker's attempt or a worker id not its own."""
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    mine = (await _upload(stub, TENANT_A_KEY, b"an input of the job")).blob.uri
    other = (await _upload(stub, TENANT_A_KEY, b"acme, but not an input")).blob.uri
    secret = (await _upload(stub, TENANT_B_KEY, b"globex's secret")).blob.uri
    job_id = await _job(cp, "acme", "running", [mine])
    theirs = await _job(cp, "globex", "running", [secret], worker_id="globex-worker")

    def md(job: str, worker_id: str = WORKER_ID, attempt: int = 1) -> list[tuple[str, str]]:
        return [
            *_md(WORKER_KEY, job),
            ("spool-worker-id", worker_id),
            ("spool-attempt", str(attempt)),
        ]

    async def download(uri: str, metadata: list[tuple[str, str]]) -> bytes:
        call = stub.Download(pb.DownloadRequest(uri=uri), metadata=metadata)
        return b"".join([m.chunk async for m in call])

    assert await download(mine, md(job_id)) == b"an input of the job"
    refused = {
        "not an input": (other, md(job_id), grpc.StatusCode.NOT_FOUND),
        "another tenant's job": (secret, md(theirs, "globex-worker"), grpc.StatusCode.NOT_FOUND),
        "a stale attempt": (mine, md(job_id, attempt=2), grpc.StatusCode.PERMISSION_DENIED),
        "another worker id": (mine, md(job_id, "someone-else"), grpc.StatusCode.PERMISSION_DENIED),
        "no worker id": (mine, _md(WORKER_KEY, job_id), grpc.StatusCode.INVALID_ARGUMENT),
    }
    for what, (uri, metadata, code) in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await download(uri, metadata)
        assert err.value.code() == code, what


async def test_fetch_missing_blob_is_permanent(cp, tmp_path: Path) -> None:
    def go() -> None:
        with BlobClient.connect(cp.address, token=TENANT_A_KEY) as client:
            fetch_input("blob:sha256:" + "ab" * 32, tmp_path, blob_client=client)

    with pytest.raises(PermanentError) as err:
        await asyncio.to_thread(go)
    assert err.value.code == "INPUT_NOT_FOUND"


async def test_garbage_collection_keeps_referenced_blobs(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    kept = (await _upload(stub, TENANT_A_KEY, b"used by a job")).blob.uri
    dropped = (await _upload(stub, TENANT_A_KEY, b"nobody uses me")).blob.uri
    shared = (await _upload(stub, TENANT_A_KEY, b"both tenants")).blob.uri
    await _upload(stub, TENANT_B_KEY, b"both tenants")
    await _job(cp, "acme", "succeeded", [kept])
    async with cp.db.session() as s, s.begin():
        await s.execute(sa.text("UPDATE blobs SET last_used_at = now() - interval '1 day'"))
    assert len(_objects(tmp_path / "blobs")) == 3
    deleted = await _blobs(cp).collect_garbage(age_s=3600)
    assert deleted == 4 - 1
    async with cp.db.session() as s:
        assert await blob_store.missing_blobs(s, "acme", [kept, dropped, shared]) == [
            dropped,
            shared,
        ]
    # Only the job's input is left on disk.
    assert [p.name for p in _objects(tmp_path / "blobs")] == [kept.rsplit(":", 1)[1]]


async def test_missing_blobs(cp, chan) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    have = (await _upload(stub, TENANT_A_KEY, b"x")).blob.uri
    other = "blob:sha256:" + "cd" * 32
    async with cp.db.session() as s:
        got = await blob_store.missing_blobs(
            s, "acme", [have, other, "https://h/x", "blob:sha256:short"]
        )
        assert got == [other, "blob:sha256:short"]
        assert await blob_store.missing_blobs(s, "globex", [have]) == [have]


class _RecordingClient(BlobClient):
    """A BlobClient that records the header of every Upload and the offset of every Download."""

    headers: list[pb.UploadRequest.Header]
    offsets: list[int]

    def download(self, uri, offset=0, length=0):
        self.offsets.append(offset)
        return super().download(uri, offset, length)

    def upload(self, requests):
        def spy():
            for req in requests:
                if req.HasField("header"):
                    self.headers.append(req.header)
                yield req

        return super().upload(spy())


async def test_upload_output_resumes_what_the_server_has(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(2 * MiB + 77)
    src = tmp_path / "out.bin"
    src.write_bytes(data)
    uri = f"blob:sha256:{hashlib.sha256(data).hexdigest()}"
    call = stub.Upload(metadata=_md(TENANT_A_KEY))
    for req in _requests(data)[:2]:  # header + 1 MiB, then the stream breaks
        await call.write(req)

    await wait_until(lambda: _received(stub, uri, MiB), timeout=10)
    call.cancel()

    def resume() -> tuple[str, list]:
        channel = grpc.insecure_channel(cp.address)
        client = _RecordingClient(channel, token=TENANT_A_KEY, owns_channel=True)
        client.headers, client.offsets = [], []
        with client:
            return upload_output(src, blob_client=client), client.headers

    got_uri, headers = await asyncio.to_thread(resume)
    assert got_uri == uri and [h.offset for h in headers] == [MiB]
    _, got = await _download(stub, TENANT_A_KEY, uri)
    assert got == data


async def test_concurrent_uploads_of_one_blob(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(3 * MiB)
    results = await asyncio.gather(*(_upload(stub, TENANT_A_KEY, data) for _ in range(3)))
    assert len({r.blob.uri for r in results}) == 1
    assert len(_objects(tmp_path / "blobs")) == 1 and not _partials(tmp_path / "blobs")
    _, got = await _download(stub, TENANT_A_KEY, results[0].blob.uri)
    assert got == data


class _CuttingProxy:
    """A TCP proxy to the control plane that cuts the first connection after `cut_after` bytes
    from the server (a connection dropped mid-download); later connections pass through."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(r, w, budget) -> None:
            sent = 0
            try:
                while data := await r.read(65536):
                    if budget is not None and sent + len(data) > budget:
                        break
                    w.write(data)
                    await w.drain()
                    sent += len(data)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                for stream in (writer, up_w):
                    stream.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_w, None)),
            asyncio.create_task(pipe(up_r, writer, limit)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks)
        for w in (writer, up_w):
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def test_blob_fetch_resumes_after_dropped_connection(cp, chan, tmp_path: Path) -> None:
    stub = blob_service_pb2_grpc.BlobServiceStub(chan)
    data = os.urandom(5 * MiB + 1)
    uri = (await _upload(stub, TENANT_A_KEY, data, filename="big.bin")).blob.uri
    proxy = _CuttingProxy(cp.port, cut_after=int(2.5 * MiB))
    address = await proxy.start()
    calls: list[dict] = []
    try:

        def fetch() -> tuple[Path, list[int]]:
            channel = grpc.insecure_channel(address)
            client = _RecordingClient(channel, token=TENANT_A_KEY, owns_channel=True)
            client.headers, client.offsets = [], []
            with client:
                path = fetch_input(
                    uri,
                    tmp_path / "in",
                    blob_client=client,
                    on_progress=lambda **kw: calls.append(kw),
                    retry_backoff_s=0.05,
                )
                return path, client.offsets

        path, offsets = await asyncio.to_thread(fetch)
    finally:
        await proxy.close()
    assert path.read_bytes() == data
    # The second Download starts where the dropped one stopped, not at 0.
    assert proxy.connections >= 2 and offsets[0] == 0
    assert 0 < offsets[-1] < len(data)
    assert calls[-1]["done"] == calls[-1]["total"] == len(data)
