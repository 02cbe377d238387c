"""Fixtures of the worker tests: a scripted control peer and in-process agents."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from fake_control import FakeControl

from worker._config import WorkerSettings
from worker.agent import Agent

#: test handlers, imported by slot processes (tests/worker is on sys.path)
TEST_HANDLERS = "spool_test_handlers"
#: what the tests use; naming them keeps slots from importing the media handlers
TEST_TYPES = ["debug.sleep", "debug.noop", "test.probe", "test.boom", "test.crash",
              "test.chatty", "test.writer", "test.odd",
              "test.thread_probe", "test.thread_sleep", "test.thread_chatty",
              "test.thread_writer"]  # fmt: skip


@pytest.fixture
async def control():
    peer = FakeControl()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest.fixture
async def start_agent(tmp_path: Path):
    """Factory: start an Agent against a FakeControl; drained and stopped after the test."""
    started: list[tuple[Agent, asyncio.Task]] = []

    async def start(peer: FakeControl, **overrides) -> Agent:
        settings = WorkerSettings(
            server=peer.address,
            worker_id=f"w-{len(started)}",
            state_dir=str(tmp_path / "state"),
            slots=overrides.pop("slots", 2),
            types=overrides.pop("types", TEST_TYPES),
            device="cpu",
            handlers=TEST_HANDLERS,
            file_root=str(tmp_path),
            drain_grace_s=overrides.pop("drain_grace_s", 0.5),
            log_level="INFO",
            **overrides,
        )
        agent = Agent(settings)
        task = asyncio.create_task(agent.run(), name="agent-under-test")
        started.append((agent, task))
        return agent

    yield start
    for agent, task in started:
        if not task.done():
            agent.request_drain("test over")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
