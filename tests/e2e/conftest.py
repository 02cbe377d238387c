"""Fixtures of the end-to-end tests (helpers in e2e_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Client, RawWorker, Workers, control_plane
from helpers import WORKER_KEY


@pytest.fixture
async def cp(database_url: str) -> AsyncIterator[Any]:
    """A control plane with short leases (auth on)."""
    async with control_plane(database_url) as plane:
        yield plane


@pytest.fixture
async def workers(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Workers]:
    """Start `spool-worker` processes with `workers.start(cp, …)`; all stopped at the end."""
    ws = Workers(tmp_path)
    try:
        yield ws
    finally:
        await ws.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for w in ws.procs:
                print(f"---- log of {w.worker_id} ----\n{w.log()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
async def client(cp: Any) -> AsyncIterator[Client]:
    """A JobService client of tenant A on `cp`."""
    c = Client(cp.address)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def raw(cp: Any) -> AsyncIterator[Any]:
    """`raw(key)` opens a Connect stream played by the test (a RawWorker); closed after."""
    opened: list[RawWorker] = []

    def connect(key: str = WORKER_KEY) -> RawWorker:
        w = RawWorker(cp.address, key)
        opened.append(w)
        return w

    try:
        yield connect
    finally:
        for w in opened:
            await w.close()
