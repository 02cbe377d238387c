"""End to end: video jobs through the Python client, a real control plane and worker process.

A small synthetic clip with a known semi-transparent logo is uploaded,
`video.remove_overlay` and `video.transcode` run in a `spool-worker`
subprocess, progress arrives in frames per stage while RUNNING, and the
downloaded outputs are checked against the clean clip. A corrupt video fails
its job with INVALID_VIDEO and the same worker then runs a good job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from e2e_support import WorkerProcess, Workers, control_plane, wait_connected
from helpers import TENANT_A_KEY

from spool.client import AsyncClient
from spool.v1 import job_pb2
from worker.media import quality, synth

FRAMES, HEIGHT, WIDTH, FPS = 48, 180, 320, 24
MEDIA_TYPES = "video.remove_overlay,video.transcode"
#: the remove_overlay stages that report progress in frames (docs/media.md)
FRAME_STAGES = {"detect", "analyse", "restore", "done"}
JOB_WAIT_S = 60.0


@dataclass
class Clip:
    case: quality.Case
    video: Path
    template: Path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    """2 s of 320x180 at 24 fps, a 72x24 logo (opacity 0.55) bottom right; clean frames kept."""
    root = tmp_path_factory.mktemp("clip")
    case = quality.make_case("static", FRAMES, HEIGHT, WIDTH)
    video = synth.write_video(root / "clip.mp4", case.blended, fps=FPS)
    return Clip(case=case, video=video, template=case.logo.save_png(root / "logo.png"))


@pytest.fixture
async def cp(database_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A control plane storing blobs under tmp_path; leases long enough for a busy 2-core box."""
    async with control_plane(database_url, blob_dir=str(tmp_path / "blobs"), lease_s=10.0) as plane:
        yield plane


@pytest.fixture
async def client(cp: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(cp.address, token=TENANT_A_KEY, retry_budget=15.0) as c:
        yield c


@pytest.fixture
async def media_worker(cp: Any, workers: Workers) -> WorkerProcess:
    """One `spool-worker` process serving the media job types, connected."""
    w = workers.start(cp, types=MEDIA_TYPES)
    await wait_connected(cp, w, wait_s=60.0)
    return w


def _probe(path: Path) -> tuple[int, float, int, int]:
    """(frames, fps, width, height) by decoding every frame."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        frames = sum(1 for _ in c.decode(vs))
        return frames, float(vs.average_rate), vs.codec_context.width, vs.codec_context.height


async def _finished(client: AsyncClient, job_id: str) -> job_pb2.Job:
    return await client.wait(job_id, timeout=JOB_WAIT_S)


async def test_remove_overlay_and_transcode(
    client: AsyncClient, media_worker: WorkerProcess, clip: Clip, tmp_path: Path
) -> None:
    job = await client.submit("video.remove_overlay", inputs=[clip.video, clip.template])
    transcode = await client.submit("video.transcode", {"width": 160}, inputs=[clip.video])
    assert all(uri.startswith("blob:sha256:") for uri in job.inputs)
    assert transcode.inputs[0] == job.inputs[0]  # the same content, uploaded once

    events = [e async for e in client.watch(job.id)]
    kinds = [(e.kind, e.state) for e in events]
    states = [s for k, s in kinds if k == job_pb2.JOB_EVENT_KIND_STATE]
    assert states[-1] == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
    running_at = kinds.index((job_pb2.JOB_EVENT_KIND_STATE, job_pb2.JOB_STATE_RUNNING))
    frame_progress = [
        (i, e.progress)
        for i, e in enumerate(events)
        if e.kind == job_pb2.JOB_EVENT_KIND_PROGRESS and e.progress.unit == "frames"
    ]
    assert frame_progress, events
    # Every frame progress arrives while RUNNING (after it, before SUCCEEDED), per stage.
    assert all(running_at < i < len(events) - 1 for i, _ in frame_progress)
    assert {p.stage for _, p in frame_progress} <= FRAME_STAGES
    last = frame_progress[-1][1]
    assert (last.stage, last.done, last.total) == ("done", FRAMES, FRAMES)
    assert all(p.total == FRAMES and 0 <= p.done <= FRAMES for _, p in frame_progress)

    done = await client.get(job.id)
    assert done.worker_id == media_worker.worker_id
    assert done.result["frames"] == FRAMES
    paths = await client.download(job.id, tmp_path / "overlay")
    assert sorted(p.name for p in paths) == ["clean.mp4", "report.json"]
    clean = tmp_path / "overlay" / "clean.mp4"
    assert _probe(clean) == (FRAMES, FPS, WIDTH, HEIGHT)
    report = json.loads((tmp_path / "overlay" / "report.json").read_text())
    assert report["mode"] == "template"
    assert report["frames_written"] == FRAMES
    before = quality.score(quality.decode(clip.video), clip.case)["psnr"]
    after = quality.score(quality.decode(clean), clip.case)["psnr"]
    assert after >= before + 15, (before, after)

    finished = await _finished(client, transcode.id)
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
    paths = await client.download(transcode.id, tmp_path / "transcode")
    assert [p.name for p in paths] == ["out.mp4"]
    assert _probe(paths[0]) == (FRAMES, FPS, 160, 90)


async def test_corrupt_video_fails_and_the_worker_keeps_serving(
    client: AsyncClient, media_worker: WorkerProcess, clip: Clip, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    bad = await client.submit("video.remove_overlay", {"mode": "auto"}, inputs=[broken])
    failed = await _finished(client, bad.id)
    assert failed.state == job_pb2.JOB_STATE_FAILED
    assert failed.error.code == "INVALID_VIDEO"
    # One readable line naming the problem, not a traceback.
    message = failed.error.message
    assert "video" in message and "Traceback" not in message and "\n" not in message, message
    assert not failed.error.retryable
    assert failed.attempt == 1  # a permanent error is not retried
    assert list(failed.outputs) == []

    good = await client.submit("video.transcode", {"width": 160}, inputs=[clip.video])
    finished = await _finished(client, good.id)
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
    assert finished.worker_id == media_worker.worker_id
    assert media_worker.proc.poll() is None
    paths = await client.download(good.id, tmp_path / "out")
    assert _probe(paths[0])[0] == FRAMES
