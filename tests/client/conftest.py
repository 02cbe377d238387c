"""Fixtures of the client tests: a control plane, a `spool-worker` subprocess, clients.

The control plane runs in the test process (auth on, test keys); helpers are in
client_support.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from client_support import CONTROL_SETTINGS, WorkerProcess, running_worker
from helpers import TENANT_A_KEY, running_control_plane

from spool.client import AsyncClient


@pytest.fixture
async def cp(database_url: str) -> AsyncIterator[Any]:
    """A control plane (auth on, short leases)."""
    async with running_control_plane(database_url, **CONTROL_SETTINGS) as plane:
        yield plane


@pytest.fixture
async def client(cp: Any) -> AsyncIterator[AsyncClient]:
    """An AsyncClient of tenant "acme" on `cp`."""
    async with AsyncClient(cp.address, token=TENANT_A_KEY, retry_budget=15.0) as c:
        yield c


@pytest.fixture
async def worker(cp: Any, tmp_path: Path, client: AsyncClient) -> AsyncIterator[WorkerProcess]:
    """A `spool-worker` subprocess connected to `cp`."""
    async with running_worker(cp, tmp_path, client) as w:
        yield w
