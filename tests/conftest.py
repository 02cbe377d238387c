"""Shared fixtures: a real Postgres, per-test isolation, a running control plane, stubs.

- `database_url` (per test, on a session-wide migrated database): every table
  is emptied before the test. The database is an embedded Postgres (pgserver)
  in a temp dir, or `TEST_DATABASE_URL` when set (it is migrated, then emptied
  before each test: do not point it at data you care about).
- `db`: a `control.db.Database` on it (for store functions in tests).
- `control`: a running control plane (auth on, test keys from helpers.py).
- `channel` / `channel_b` / `worker_channel`: aio channels to it with the keys of
  tenant "acme", tenant "globex" and the worker; `jobs` / `jobs_b`: JobService stubs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from helpers import (
    TENANT_A_KEY,
    TENANT_B_KEY,
    WORKER_KEY,
    open_channel,
    running_control_plane,
)

from control.db import Database, libpq_url
from control.embedded import EmbeddedPostgres
from control.migrations import upgrade_sync
from control.schema import metadata
from control.server import ControlPlane
from spool.v1 import job_service_pb2_grpc

TEST_DATABASE = "spool_test"
_TRUNCATE_SQL = "TRUNCATE {} RESTART IDENTITY CASCADE".format(
    ", ".join(f'"{name}"' for name in metadata.tables)
)


@pytest.fixture(scope="session")
def _migrated_database_url() -> Iterator[str]:
    """A migrated database for the whole session (embedded, or TEST_DATABASE_URL)."""
    url = os.environ.get("TEST_DATABASE_URL", "")
    embedded = None
    if not url:
        # Not under pytest's basetemp: concurrent pytest runs prune each other's
        # old basetemps, which must never happen under a running Postgres.
        root = Path(tempfile.mkdtemp(prefix="spool-test-pg-"))
        embedded = EmbeddedPostgres(root / "data", delete_on_stop=True)
        embedded.start()
        url = embedded.create_database(TEST_DATABASE)
    upgrade_sync(url)
    try:
        yield url
    finally:
        if embedded is not None:
            embedded.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(_migrated_database_url: str) -> str:
    """The test database's URL, with every table emptied before the test."""
    conn = await asyncpg.connect(libpq_url(_migrated_database_url))
    try:
        await conn.execute("SET lock_timeout = '10s'")
        await conn.execute(_TRUNCATE_SQL)
    finally:
        await conn.close()
    return _migrated_database_url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A connection pool on the (emptied) test database."""
    database = Database(database_url, pool_size=5, max_overflow=5)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[ControlPlane]:
    """A running control plane with auth on (keys in helpers.py)."""
    async with running_control_plane(database_url) as cp:
        yield cp


@pytest.fixture
async def channel(control: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `control` as tenant "acme" (TENANT_A_KEY)."""
    async with open_channel(control.address, TENANT_A_KEY) as ch:
        yield ch


@pytest.fixture
async def channel_b(control: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `control` as tenant "globex" (TENANT_B_KEY)."""
    async with open_channel(control.address, TENANT_B_KEY) as ch:
        yield ch


@pytest.fixture
async def worker_channel(control: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `control` with the worker key."""
    async with open_channel(control.address, WORKER_KEY) as ch:
        yield ch


@pytest.fixture
def jobs(channel: grpc.aio.Channel) -> job_service_pb2_grpc.JobServiceStub:
    """JobService as tenant "acme"."""
    return job_service_pb2_grpc.JobServiceStub(channel)


@pytest.fixture
def jobs_b(channel_b: grpc.aio.Channel) -> job_service_pb2_grpc.JobServiceStub:
    """JobService as tenant "globex"."""
    return job_service_pb2_grpc.JobServiceStub(channel_b)
