"""The connection pool and sessions (SQLAlchemy 2 asyncio over asyncpg).

Whoever opens a connection owns it and its transaction:

    async with db.transaction() as s:          # Core, one transaction
        job = await store.jobs.get_job(s, tenant, job_id)
    async with db.autocommit() as s:           # each statement commits by itself
        ...

Data-layer functions take a session and never commit. No session outlives the
unit of work that opened it: a stream or background task opens a fresh short
session for each read or write instead of holding one while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

T = TypeVar("T")

#: how long dispose() waits for shielded work still running
DISPOSE_WAIT_S = 5.0


def async_url(url: str) -> str:
    """`postgresql://…` (any driver) → the `postgresql+asyncpg://…` SQLAlchemy uses."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """`postgresql+driver://…` → plain `postgresql://…` (for asyncpg.connect, psql, alembic)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """One engine (connection pool) per process, and a session factory on it."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        self.url = libpq_url(url)
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=False,
            # A connection broken by a Postgres restart is dropped, not reused.
            pool_recycle=3600,
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._shielded: set[asyncio.Task[object]] = set()

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection where each statement commits by itself.

        For work that is one statement (or reads that need no common snapshot):
        no BEGIN/COMMIT round trips. Store functions accept it where they take
        a session (they only call `.execute`).
        """
        async with self._autocommit_engine.connect() as conn:
            yield conn

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A pooled connection in a transaction, committed at the end (rolled back on error).

        SQLAlchemy Core, no ORM session in between: the hot paths (dispatch,
        leases, submits) only execute statements, and the ORM layer costs more
        per statement than the statement's own round trip. Store functions take
        it where they take a session.
        """
        return self.engine.begin()

    def session(self) -> AsyncSession:
        """A new session; use as `async with db.session() as s, s.begin(): …`."""
        return self._sessions()

    async def shielded(self, work: Awaitable[T]) -> T:
        """Run `work` to completion even if the caller is cancelled.

        A task cancelled in the middle of a query can leave its connection
        half-used; database work of RPC handlers and streams goes through here
        so it always finishes (and returns its connection) first.
        """
        task = asyncio.ensure_future(work)
        self._shielded.add(task)
        task.add_done_callback(self._shielded.discard)
        return await asyncio.shield(task)

    async def ping(self) -> None:
        """Raise unless the database answers `SELECT 1`."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        """Wait (briefly) for shielded work still running, then close every pooled connection."""
        if self._shielded:
            await asyncio.wait(list(self._shielded), timeout=DISPOSE_WAIT_S)
        await self.engine.dispose()
