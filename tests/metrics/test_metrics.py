"""Prometheus `/metrics` of the control plane and of the worker, scraped over HTTP.

A real control plane in the test process (metrics on a free port, gauges
refreshed every 0.1 s) and real `spool-worker` processes with their own
metrics port. The prometheus registry is process-global (earlier tests in this
process moved the same counters), so counters are compared before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2
from helpers import TENANT_A_KEY, WORKER_KEY, open_channel, running_control_plane, wait_until
from prometheus_client.parser import text_string_to_metric_families

from control.config import Settings
from control.main import build_parser
from control.server import ControlPlane, start_server
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from worker._config import build_parser as worker_parser

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

CONTROL_SERIES = {
    "spool_jobs": "gauge",
    "spool_queue_depth": "gauge",
    "spool_oldest_queued_age_seconds": "gauge",
    "spool_connected_workers": "gauge",
    "spool_open_streams": "gauge",
    "spool_db_pool_in_use": "gauge",
    "spool_db_pool_size": "gauge",
    # the parser names counter families without `_total`
    "spool_jobs_submitted": "counter",
    "spool_jobs_dispatched": "counter",
    "spool_jobs_finished": "counter",
    "spool_dispatch_latency_seconds": "histogram",
}
WORKER_SERIES = {
    "spool_worker_running_jobs": "gauge",
    "spool_worker_slots": "gauge",
    "spool_worker_connected": "gauge",
    "spool_worker_jobs": "counter",
    "spool_worker_handler_duration_seconds": "histogram",
    "spool_worker_frames_per_second": "gauge",
    "spool_worker_gpu_memory_bytes": "gauge",
}
WORKER_TYPES = "debug.noop,debug.sleep,test.frames"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One scrape of a /metrics endpoint: families by name, sample values by labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The value of `sample` whose labels include `labels` (0 when absent)."""
        family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
        family = family.removesuffix("_bucket")
        for s in self.families[family].samples if family in self.families else ():
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return 0.0


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def scrape(port: int) -> Scrape:
    return Scrape(await asyncio.to_thread(_get, port))


async def scrape_when_up(port: int) -> Scrape:
    """Scrape, waiting for the endpoint to answer (a worker process starting)."""

    async def attempt() -> Scrape | None:
        try:
            return await scrape(port)
        except OSError:
            return None

    return await wait_until(attempt, timeout=30, interval=0.1, message=f"no /metrics on {port}")


async def wait_value(port: int, sample: str, want: float, **labels: str) -> Scrape:
    """Scrape until `sample{labels}` equals `want`; return that scrape."""

    async def reached() -> Scrape | None:
        s = await scrape(port)
        return s if s.value(sample, **labels) == want else None

    try:
        return await wait_until(reached, timeout=20, interval=0.05)
    except AssertionError:
        got = (await scrape(port)).value(sample, **labels)
        raise AssertionError(f"{sample}{labels} is {got}, want {want}") from None


def assert_series(scraped: Scrape, expected: dict[str, str]) -> None:
    for name, kind in expected.items():
        assert name in scraped.families, f"{name} missing from /metrics"
        assert scraped.families[name].type == kind, name


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
async def metered(database_url: str) -> AsyncIterator[ControlPlane]:
    """A control plane with /metrics on a free port and fast gauge refreshes."""
    async with running_control_plane(
        database_url,
        metrics_port=free_port(),
        metrics_refresh_s=0.1,
        lease_s=2.0,
        heartbeat_s=0.5,
    ) as cp:
        yield cp


@pytest.fixture
async def jobs(metered: ControlPlane) -> AsyncIterator[job_service_pb2_grpc.JobServiceStub]:
    async with open_channel(metered.address, TENANT_A_KEY) as channel:
        yield job_service_pb2_grpc.JobServiceStub(channel)


@contextlib.contextmanager
def worker_process(server: str, tmp: Path, metrics_port: int) -> Iterator[subprocess.Popen]:
    """A `spool-worker` with /metrics on `metrics_port`; drained and reaped after."""
    wid = f"w-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SPOOL_SERVER": server,
        "SPOOL_TOKEN": WORKER_KEY,
        "SPOOL_WORKER_ID": wid,
        "SPOOL_WORKER_TYPES": WORKER_TYPES,
        "SPOOL_WORKER_HANDLERS": "metrics_handlers:Frames",
        "SPOOL_WORKER_STATE_DIR": str(tmp / f"{wid}.state"),
        "SPOOL_WORKER_WORKDIR": str(tmp / f"{wid}.work"),
        "SPOOL_WORKER_METRICS_PORT": str(metrics_port),
        "SPOOL_DRAIN_GRACE_S": "1",
        "SPOOL_DEVICE": "cpu",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
    }
    log_path = tmp / f"{wid}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.main"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        yield proc
    except BaseException:
        print(f"---- worker log ----\n{log_path.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spec(job_type: str, **params: Any) -> job_pb2.JobSpec:
    s = struct_pb2.Struct()
    s.update(params)
    return job_pb2.JobSpec(type=job_type, params=s)


async def submit(jobs: Any, job_type: str, **params: Any) -> str:
    reply = await jobs.Submit(job_service_pb2.SubmitRequest(job=spec(job_type, **params)))
    return reply.job.id


async def wait_job(jobs: Any, job_id: str, state: int) -> None:
    async def reached() -> bool:
        reply = await jobs.Get(job_service_pb2.GetRequest(job_id=job_id))
        return reply.job.state == state

    await wait_until(reached, timeout=20, message=f"job {job_id} never reached state {state}")


# ---------------------------------------------------------------------- control plane


async def test_control_series_and_queue_gauges(metered: ControlPlane, jobs: Any) -> None:
    port = metered.settings.metrics_port
    before = await scrape(port)
    assert_series(before, CONTROL_SERIES)
    states = {s.labels["state"] for s in before.families["spool_jobs"].samples}
    assert states == {"queued", "running", "succeeded", "failed", "canceled"}

    async def pool_used() -> bool:  # the refresh itself takes a connection
        return (await scrape(port)).value("spool_db_pool_size") >= 1

    await wait_until(pool_used)

    # No worker: the submitted jobs stay queued and the gauges show them.
    kind = f"metrics.queued.{uuid.uuid4().hex[:6]}"
    ids = [await submit(jobs, kind) for _ in range(3)]
    batch = job_service_pb2.SubmitBatchRequest(
        jobs=[spec(kind), spec(kind), spec(kind)],
    )
    batch.jobs[0].request_id = batch.jobs[1].request_id = "same"  # repeated: refused
    with pytest.raises(grpc.aio.AioRpcError):
        await jobs.SubmitBatch(batch)
    batch.jobs[1].request_id = ""
    await jobs.SubmitBatch(batch)
    await jobs.SubmitBatch(batch)  # job 0 is deduplicated by its request_id: not counted
    after = await wait_value(port, "spool_queue_depth", 8)
    assert after.value("spool_jobs_submitted_total", type=kind) == 8
    assert after.value("spool_jobs", state="queued") == 8
    assert after.value("spool_oldest_queued_age_seconds") > 0
    assert after.value("spool_connected_workers") == 0

    # Cancelling a queued job finishes it (the control plane's own terminal CAS).
    await jobs.Cancel(job_service_pb2.CancelRequest(job_id=ids[0]))
    after = await wait_value(port, "spool_queue_depth", 7)
    assert after.value("spool_jobs_finished_total", type=kind, state="canceled") == 1
    assert after.value("spool_jobs", state="canceled") == 1
    assert after.value("spool_jobs_dispatched_total", type=kind) == 0

    # A WatchProgress stream is an open stream while it lasts.
    watching = before.value("spool_open_streams", kind="watch")
    call = jobs.WatchProgress(job_service_pb2.WatchProgressRequest(job_id=ids[1]))
    await call.read()  # the QUEUED event: the stream is open
    await wait_value(port, "spool_open_streams", watching + 1, kind="watch")
    call.cancel()
    await wait_value(port, "spool_open_streams", watching, kind="watch")


async def test_a_taken_metrics_port_fails_start(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(listen="127.0.0.1:0", database_url=database_url, metrics_port=port)
        with pytest.raises(RuntimeError, match="cannot serve metrics"):
            await start_server(settings)


# ---------------------------------------------------------------------- with a worker


async def test_counters_move_when_jobs_run(
    metered: ControlPlane, jobs: Any, tmp_path: Path
) -> None:
    port = metered.settings.metrics_port
    wport = free_port()
    c0 = await scrape(port)
    with worker_process(metered.address, tmp_path, wport):
        w0 = await scrape_when_up(wport)
        assert_series(w0, WORKER_SERIES)
        assert w0.value("spool_worker_slots") == 1
        # CPU worker: the GPU family is declared but has no samples.
        assert not w0.families["spool_worker_gpu_memory_bytes"].samples
        await wait_value(wport, "spool_worker_connected", 1)
        c1 = await wait_value(port, "spool_connected_workers", 1)
        assert c1.value("spool_open_streams", kind="worker") == (
            c0.value("spool_open_streams", kind="worker") + 1
        )

        noop = [await submit(jobs, "debug.noop") for _ in range(2)]
        sleep = await submit(jobs, "debug.sleep", duration=0.2, steps=2)
        failing = await submit(
            jobs, "debug.sleep", duration=0.05, steps=1, fail_at=1, fail_permanent=True
        )
        for job_id in [*noop, sleep]:
            await wait_job(jobs, job_id, job_pb2.JOB_STATE_SUCCEEDED)
        await wait_job(jobs, failing, job_pb2.JOB_STATE_FAILED)

        c2 = await scrape(port)

        def moved(sample: str, **labels: str) -> float:
            return c2.value(sample, **labels) - c0.value(sample, **labels)

        assert moved("spool_jobs_submitted_total", type="debug.noop") == 2
        assert moved("spool_jobs_submitted_total", type="debug.sleep") == 2
        assert moved("spool_jobs_dispatched_total", type="debug.noop") == 2
        assert moved("spool_jobs_dispatched_total", type="debug.sleep") == 2
        assert moved("spool_jobs_finished_total", type="debug.noop", state="succeeded") == 2
        assert moved("spool_jobs_finished_total", type="debug.sleep", state="succeeded") == 1
        assert moved("spool_jobs_finished_total", type="debug.sleep", state="failed") == 1
        assert moved("spool_dispatch_latency_seconds_count") == 4
        # The gauges come from a refresh: wait for one taken after the last job ended.
        c3 = await wait_value(port, "spool_jobs", 1, state="failed")
        assert c3.value("spool_jobs", state="succeeded") == 3

        w1 = await wait_value(wport, "spool_worker_running_jobs", 0)
        assert w1.value("spool_worker_jobs_total", type="debug.noop", outcome="completed") == 2
        assert w1.value("spool_worker_jobs_total", type="debug.sleep", outcome="completed") == 1
        assert w1.value("spool_worker_jobs_total", type="debug.sleep", outcome="failed") == 1
        durations = "spool_worker_handler_duration_seconds_count"
        assert w1.value(durations, type="debug.noop") == 2
        assert w1.value(durations, type="debug.sleep") == 2
        assert w1.value("spool_worker_handler_duration_seconds_sum", type="debug.sleep") >= 0.2

        # A job reporting progress in frames shows its rate while it runs, then 0.
        frames = await submit(jobs, "test.frames", frames=60, fps=30)
        await wait_value(wport, "spool_worker_running_jobs", 1)

        async def rate() -> float:
            fps = (await scrape(wport)).value("spool_worker_frames_per_second", type="test.frames")
            return fps if fps > 0 else 0.0

        fps = await wait_until(rate, timeout=10)
        assert 5 < fps < 60, fps
        await wait_job(jobs, frames, job_pb2.JOB_STATE_SUCCEEDED)
        w2 = await wait_value(wport, "spool_worker_frames_per_second", 0, type="test.frames")
        assert w2.value("spool_worker_running_jobs") == 0
        assert w2.value("spool_worker_jobs_total", type="test.frames", outcome="completed") == 1

    # The worker left: its stream closed.
    await wait_value(port, "spool_connected_workers", 0)
    await wait_value(
        port, "spool_open_streams", c0.value("spool_open_streams", kind="worker"), kind="worker"
    )


# ---------------------------------------------------------------------- configuration


def test_settings_and_flags() -> None:
    assert Settings().metrics_port == 0  # off unless asked (make run and compose ask)
    assert Settings().metrics_addr == "127.0.0.1"
    help_text = build_parser().format_help()
    for name in ("SPOOL_METRICS_PORT", "SPOOL_METRICS_ADDR", "--metrics-port", "--metrics-refresh"):
        assert name in help_text
    ns = worker_parser().parse_args(["--metrics-port", "9999", "--metrics-addr", "0.0.0.0"])
    assert (ns.metrics_port, ns.metrics_addr) == (9999, "0.0.0.0")
    default = int(os.environ.get("SPOOL_WORKER_METRICS_PORT") or 0)
    assert worker_parser().parse_args([]).metrics_port == default


def test_compose_publishes_control_metrics() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    control = compose["services"]["control"]
    env = {k: str(v) for k, v in control["environment"].items()}
    port = int(env["SPOOL_METRICS_PORT"])
    assert env["SPOOL_METRICS_ADDR"] == "0.0.0.0"
    assert f"127.0.0.1:{port}:{port}" in [str(p) for p in control["ports"]]
    worker_env = compose["services"]["worker"]["environment"]
    assert int(worker_env["SPOOL_WORKER_METRICS_PORT"]) > 0


def test_gpu_memory_sums_the_slots_per_device() -> None:
    from prometheus_client import REGISTRY

    from worker import metrics as worker_metrics
    from worker._slot_child import cuda_memory

    assert cuda_memory("cpu") is None  # a slot off CUDA reports nothing
    slot = {"device": "cuda:7", "allocated": 100, "reserved": 300, "peak": 200}
    worker_metrics.set_gpu_memory([slot, None, {**slot, "allocated": 5}])

    def value(kind: str) -> float | None:
        labels = {"device": "cuda:7", "kind": kind}
        return REGISTRY.get_sample_value("spool_worker_gpu_memory_bytes", labels)

    assert (value("allocated"), value("reserved"), value("peak")) == (105, 600, 400)
