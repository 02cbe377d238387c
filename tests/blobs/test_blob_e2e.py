"""End to end: upload a model and images, submit model.infer, a worker process runs it,
the outputs come back as blobs of the tenant. Also: a job whose model is not a model fails
with BAD_MODEL and the worker keeps serving; Submit refuses blob inputs that do not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from blob_fixtures import make_images
from google.protobuf import struct_pb2
from helpers import TENANT_A_KEY, WORKER_KEY, open_channel, running_control_plane, wait_until

from spool.v1 import blob_service_pb2 as pb
from spool.v1 import blob_service_pb2_grpc, job_pb2, job_service_pb2, job_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


@pytest.fixture
async def plane(database_url: str, tmp_path: Path) -> AsyncIterator:
    async with running_control_plane(
        database_url, blob_dir=str(tmp_path / "blobs"), lease_s=5.0, heartbeat_s=0.5
    ) as cp:
        yield cp


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.main"], cwd=REPO, env=env, stdout=log, stderr=log
        )


@pytest.fixture
async def worker(plane, tmp_path: Path) -> AsyncIterator[subprocess.Popen]:
    """One `spool-worker` process serving model.infer."""
    env = {
        **os.environ,
        "SPOOL_SERVER": plane.address,
        "SPOOL_TOKEN": WORKER_KEY,
        "SPOOL_WORKER_ID": "w-blobs",
        "SPOOL_WORKER_TYPES": "model.infer",
        "SPOOL_WORKER_STATE_DIR": str(tmp_path / "w.state"),
        "SPOOL_WORKER_WORKDIR": str(tmp_path / "w.work"),
        "SPOOL_DEVICE": "cpu",
        "PYTHONPATH": str(REPO),
    }
    proc = _start_worker(env, tmp_path / "worker.log")
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def _upload(stub, data: bytes, filename: str) -> str:
    sha = hashlib.sha256(data).hexdigest()
    reqs = [
        pb.UploadRequest(
            header=pb.UploadRequest.Header(sha256=sha, size=len(data), filename=filename)
        )
    ]
    reqs += [pb.UploadRequest(chunk=data[i : i + MiB]) for i in range(0, len(data), MiB)]
    return (await stub.Upload(iter(reqs))).blob.uri


async def _download(stub, uri: str) -> tuple[str, bytes]:
    msgs = [m async for m in stub.Download(pb.DownloadRequest(uri=uri))]
    return msgs[0].blob.filename, b"".join(m.chunk for m in msgs)


async def _wait_done(jobs, job_id: str, wait_s: float = 60.0) -> job_pb2.Job:
    terminal = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELED}

    async def done() -> job_pb2.Job | None:
        job = (await jobs.Get(job_service_pb2.GetRequest(job_id=job_id))).job
        return job if job.state in terminal else None

    return await wait_until(done, timeout=wait_s)


def _spec(inputs: list[str], **params) -> job_pb2.JobSpec:
    p = struct_pb2.Struct()
    p.update(params)
    return job_pb2.JobSpec(type="model.infer", inputs=inputs, params=p, max_attempts=1)


async def test_model_infer_through_control_plane_and_worker(
    plane, worker, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    async with open_channel(plane.address, TENANT_A_KEY) as ch:
        blobs = blob_service_pb2_grpc.BlobServiceStub(ch)
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        model = await _upload(blobs, tiny_models["export"].read_bytes(), "tiny.pt2")
        images = [
            await _upload(blobs, p.read_bytes(), p.name)
            for p in make_images(tmp_path, [(20, 30), (16, 16), (40, 10)])
        ]
        job = await jobs.Submit(
            job_service_pb2.SubmitRequest(
                job=_spec([model, *images], resize="letterbox", size=[16, 16], batch_size=2)
            )
        )
        job = await _wait_done(jobs, job.job.id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, (job.error, _log(tmp_path))
        assert job.result["items"] == 3
        files = {}
        for uri in job.outputs:
            name, data = await _download(blobs, uri)
            files[name] = data
        assert set(files) == {"index.jsonl", "output-00000.npy"}
        assert np.load(io.BytesIO(files["output-00000.npy"])).shape == (3, 4)
        assert len(files["index.jsonl"].decode().splitlines()) == 3

        # A model that is not a model: FAILED with BAD_MODEL, and the worker keeps serving.
        junk = await _upload(blobs, b"not a model at all" * 100, "junk.pt2")
        bad = await jobs.Submit(job_service_pb2.SubmitRequest(job=_spec([junk, images[0]])))
        bad = await _wait_done(jobs, bad.job.id)
        assert bad.state == job_pb2.JOB_STATE_FAILED
        assert bad.error.code == "BAD_MODEL" and not bad.error.retryable
        again = await jobs.Submit(job_service_pb2.SubmitRequest(job=_spec([model, images[1]])))
        again = await _wait_done(jobs, again.job.id)
        assert again.state == job_pb2.JOB_STATE_SUCCEEDED, again.error
        assert worker.poll() is None


def _log(tmp_path: Path) -> str:
    with contextlib.suppress(OSError):
        return (tmp_path / "worker.log").read_text()[-3000:]
    return ""


async def test_submit_refuses_missing_blob_inputs(plane) -> None:
    async with open_channel(plane.address, TENANT_A_KEY) as ch:
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        blobs = blob_service_pb2_grpc.BlobServiceStub(ch)
        have = await _upload(blobs, b"present", "p.bin")
        missing = "blob:sha256:" + "ef" * 32
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.Submit(job_service_pb2.SubmitRequest(job=_spec([have, missing])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "job.inputs[1]" in err.value.details()
        assert json.dumps(missing)[1:-1] in err.value.details()
