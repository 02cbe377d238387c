"""Issue 8, hole 5: a database outage is UNAVAILABLE (retryable), not INTERNAL.

A private Postgres (not the session's) is stopped under a running control
plane and started again: calls during the outage are answered UNAVAILABLE,
calls after it succeed, the spool client rides through it by retrying, and
the server keeps serving throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import TENANT_A_KEY, open_channel, running_control_plane, wait_until

from control.embedded import EmbeddedPostgres
from control.migrations import upgrade_sync
from spool.client import AsyncClient
from spool.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

pb = job_service_pb2
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class RestartablePostgres:
    """An embedded Postgres in its own temp dir that a test can stop and start again."""

    def __init__(self) -> None:
        # Short path: the unix socket lives in the data dir.
        self.root = Path(tempfile.mkdtemp(prefix="spool-outage-"))
        self.pg = EmbeddedPostgres(self.root / "data")
        self.url = ""

    def start(self) -> str:
        self.pg.start()
        url = self.pg.create_database("outage")
        assert not self.url or url == self.url, "the URL must survive a restart"
        self.url = url
        return url

    def stop(self) -> None:
        self.pg.stop()  # pg_ctl stop (fast: open connections get admin shutdown)

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
async def outage_pg() -> AsyncIterator[RestartablePostgres]:
    pg = RestartablePostgres()
    try:
        url = await asyncio.to_thread(pg.start)
        await asyncio.to_thread(upgrade_sync, url)
        yield pg
    finally:
        await asyncio.to_thread(pg.remove)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def calls(jobs: Any, blobs: Any, job_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One of each client call, as factories (a call can be awaited once)."""
    return {
        "Submit": lambda: jobs.Submit(
            pb.SubmitRequest(job=job_pb2.JobSpec(type="t", request_id=uuid.uuid4().hex))
        ),
        "SubmitBatch": lambda: jobs.SubmitBatch(
            pb.SubmitBatchRequest(jobs=[job_pb2.JobSpec(type="t", request_id=uuid.uuid4().hex)])
        ),
        "Get": lambda: jobs.Get(pb.GetRequest(job_id=job_id)),
        "List": lambda: jobs.List(pb.ListRequest()),
        "Cancel": lambda: jobs.Cancel(pb.CancelRequest(job_id=job_id)),
        "GetStats": lambda: jobs.GetStats(pb.GetStatsRequest()),
        "ListWorkers": lambda: jobs.ListWorkers(pb.ListWorkersRequest()),
        "WatchProgress": lambda: jobs.WatchProgress(pb.WatchProgressRequest(job_id=job_id)).read(),
        "Stat": lambda: blobs.Stat(blob_service_pb2.StatRequest(uri="blob:sha256:" + "0" * 64)),
    }


async def test_postgres_restart_is_unavailable_then_served(outage_pg, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spool.rpc")
    async with (
        running_control_plane(outage_pg.url, db_pool_size=2, db_max_overflow=2) as cp,
        open_channel(cp.address, TENANT_A_KEY) as channel,
        AsyncClient(cp.address, token=TENANT_A_KEY, retry_budget=60.0) as client,
    ):
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        blobs = blob_service_pb2_grpc.BlobServiceStub(channel)
        queued = (await jobs.Submit(pb.SubmitRequest(job=job_pb2.JobSpec(type="t")))).job
        kept = (await jobs.Submit(pb.SubmitRequest(job=job_pb2.JobSpec(type="t")))).job

        await asyncio.to_thread(outage_pg.stop)
        during = {name: await code_of(make()) for name, make in calls(jobs, blobs, kept.id).items()}
        assert during == dict.fromkeys(during, UNAVAILABLE), during
        # The retrying client is waiting through the outage, not failing.
        riding = [
            asyncio.ensure_future(client.get(queued.id)),
            asyncio.ensure_future(client.submit("t", request_id="through-the-outage")),
            asyncio.ensure_future(client.cancel(queued.id)),
        ]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in riding), [t.exception() for t in riding if t.done()]

        await asyncio.to_thread(outage_pg.start)
        # The first calls may still meet a pooled connection the restart broke: UNAVAILABLE.
        await wait_until(
            lambda: _ok(jobs.Get(pb.GetRequest(job_id=kept.id))),
            timeout=30,
            message="Get never succeeded after the restart",
        )
        after = {name: await code_of(make()) for name, make in calls(jobs, blobs, kept.id).items()}
        assert after == {
            **dict.fromkeys(after, grpc.StatusCode.OK),
            "Stat": grpc.StatusCode.NOT_FOUND,
        }, after
        got, submitted, canceled = await asyncio.wait_for(asyncio.gather(*riding), 60)
        assert got.id == queued.id and submitted.request_id == "through-the-outage"
        assert canceled.state == job_pb2.JOB_STATE_CANCELED
        # Idempotent: the retried Submit made one job.
        again = await client.submit("t", request_id="through-the-outage")
        assert again.id == submitted.id
    messages = [r.getMessage() for r in caplog.records]
    assert any("database unavailable" in m for m in messages)
    assert not any("unexpected error" in m for m in messages), messages


async def _ok(call: Awaitable[Any]) -> bool:
    code = await code_of(call)
    assert code in (grpc.StatusCode.OK, UNAVAILABLE), code
    return code == grpc.StatusCode.OK
