"""A watch survives a control plane restart: no event missed, none repeated."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from client_support import CONTROL_SETTINGS, running_worker
from helpers import TENANT_A_KEY, running_control_plane, wait_until

from spool.client import AsyncClient
from spool.v1 import job_pb2

pytestmark = pytest.mark.timeout(90)


async def test_watch_resumes_after_control_plane_restart(database_url: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        cp = await stack.enter_async_context(
            running_control_plane(database_url, **CONTROL_SETTINGS)
        )
        client = await stack.enter_async_context(
            AsyncClient(cp.address, token=TENANT_A_KEY, retry_budget=30.0)
        )
        await stack.enter_async_context(running_worker(cp, tmp_path, client))
        job = await client.submit("debug.sleep", {"duration": 4.0, "steps": 40})
        events: list[job_pb2.JobEvent] = []

        async def follow() -> None:
            async for event in client.watch(job.id):
                events.append(event)

        watcher = asyncio.create_task(follow())
        await wait_until(
            lambda: any(e.kind == job_pb2.JOB_EVENT_KIND_PROGRESS for e in events), timeout=20
        )
        seen_before = len(events)
        await cp.stop(grace=0.2)
        # A new control plane on the same port and database; the worker and the
        # watch both reconnect to it by themselves.
        await stack.enter_async_context(
            running_control_plane(database_url, listen=f"127.0.0.1:{cp.port}", **CONTROL_SETTINGS)
        )
        await asyncio.wait_for(watcher, timeout=40)

        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), seqs  # dense: no gap, no repeat
        assert len(events) > seen_before  # events after the restart arrived too
        assert events[-1].kind == job_pb2.JOB_EVENT_KIND_STATE
        assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
        final = await client.get(job.id)
        assert final.last_seq == seqs[-1]
