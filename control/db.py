"""The connection pools and the statement runner (asyncpg, SQLAlchemy for the rest).

Whoever opens a connection owns it and its transaction:

    async with db.transaction() as s:          # one transaction
        job = await store.jobs.get_job(s, tenant, job_id)
    async with db.autocommit() as s:           # each statement commits by itself
        ...

Data-layer functions take a connection and never commit. No connection
outlives the unit of work that opened it: a stream or background task opens a
fresh one for each read or write instead of holding one while it waits.

Every statement of the data layer is a `sqlalchemy.text()` clause, written
once with named parameters. `transaction()` and `autocommit()` run them on a
plain asyncpg pool (`StatementRunner`): each clause is compiled to
`$n`-positional SQL once per process and prepared once per connection (asyncpg's
statement cache), and
rows come back as light `Row` objects with the small part of SQLAlchemy's
result API the store uses. SQLAlchemy's own execution layer cost about as much
CPU per statement as the statement's round trip to Postgres, on every hot
path (submit, claim, completion, watch). SQLAlchemy stays for what it is good
at: the schema, Alembic migrations, and the ORM `session()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

T = TypeVar("T")

#: how long dispose() waits for shielded work still running
DISPOSE_WAIT_S = 5.0
#: prepared statements asyncpg keeps per connection (least recently used ones are closed)
STATEMENTS_PER_CONNECTION = 256
#: compiled clauses kept per process (dynamic SQL, like List's filters, varies)
COMPILED_CACHE_SIZE = 1024
#: a pooled connection unused this long is closed
POOL_IDLE_S = 300.0
#: Claims read the head of the queue: the first rows of the claim index, in its
#: order. With statistics that lag the table (a burst of submits into a table
#: last analyzed nearly empty, which is how every batch arrives) the planner
#: reads every queued row and sorts them instead: a claim of one job then took
#: 16 ms at 20,000 queued and grows with the queue; the index walk took 0.2 ms.
#: Claim statements run on connections where only the index walk is allowed.
CLAIM_PLANNER_SETTINGS = {"enable_bitmapscan": "off", "enable_seqscan": "off"}
#: claims run one at a time per replica (plus a hand-back)
CLAIM_CONNECTIONS = 2

_DIALECT = pg_asyncpg.dialect()


def async_url(url: str) -> str:
    """`postgresql://…` (any driver) → the `postgresql+asyncpg://…` SQLAlchemy uses."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """`postgresql+driver://…` → plain `postgresql://…` (for asyncpg.connect, psql, alembic)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# ---------------------------------------------------------------- results


class Row:
    """One result row: by column name (`row.id`, `row._mapping["id"]`) or position."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, index: int) -> Any:
        return tuple(self._mapping.values())[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.values())

    def __len__(self) -> int:
        return len(self._mapping)

    def __repr__(self) -> str:
        return f"Row({self._mapping!r})"


class Result:
    """The rows of one statement, and its row count (for statements without RETURNING)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)

    def all(self) -> list[Row]:
        return list(self._rows)

    def first(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def one(self) -> Row:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self._rows)}")
        return self._rows[0][0] if self._rows else None

    def mappings(self) -> _Mappings:
        return _Mappings([r._mapping for r in self._rows])


@dataclass(frozen=True)
class _Mappings:
    rows: list[dict[str, Any]]

    def all(self) -> list[dict[str, Any]]:
        return self.rows

    def first(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class Compiled:
    """A text clause as asyncpg runs it: `$n` SQL, parameter names in order, JSON columns."""

    sql: str
    names: tuple[str, ...]
    #: result columns declared JSON/JSONB (`.columns(...)`): decoded to Python values
    json_columns: frozenset[str]

    def args(self, params: Mapping[str, Any] | None) -> list[Any]:
        params = params or {}
        try:
            return [params[name] for name in self.names]
        except KeyError as exc:
            raise sa.exc.ArgumentError(f"missing value for parameter {exc.args[0]!r}") from None


#: id(clause) -> (the clause, kept so its id is not reused; what it compiled to)
_compiled: OrderedDict[int, tuple[Any, Compiled]] = OrderedDict()


def compile_clause(stmt: sa.TextClause | sa.TextualSelect) -> Compiled:
    """`stmt` compiled for asyncpg (cached: the store's clauses are module constants)."""
    key = id(stmt)
    hit = _compiled.get(key)
    if hit is not None:
        _compiled.move_to_end(key)
        return hit[1]
    c = stmt.compile(dialect=_DIALECT)
    json_columns = frozenset(
        col.name for col in getattr(stmt, "selected_columns", ()) if isinstance(col.type, sa.JSON)
    )
    found = Compiled(c.string, tuple(c.positiontup or ()), json_columns)
    _compiled[key] = (stmt, found)
    if len(_compiled) > COMPILED_CACHE_SIZE:
        _compiled.popitem(last=False)
    return found


class StatementRunner:
    """What the data layer is given: `execute(text_clause, params)` on one connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(
        self, stmt: sa.TextClause | sa.TextualSelect, params: Mapping[str, Any] | None = None
    ) -> Result:
        """Run one statement; its rows (JSON columns decoded) and row count."""
        c = compile_clause(stmt)
        # asyncpg's own `execute` path (prepared, cached per connection), which
        # also hands back the command status: the row count of an UPDATE/DELETE.
        records, status, _ = await self.conn._execute(c.sql, c.args(params), 0, None,
                                                      return_status=True)  # fmt: skip
        tail = status.rsplit(b" ", 1)[-1] if status else b""
        rowcount = int(tail) if tail.isdigit() else -1
        rows = []
        for record in records:
            mapping = dict(zip(record.keys(), record.values(), strict=True))
            for name in c.json_columns:
                value = mapping.get(name)
                if isinstance(value, str):
                    mapping[name] = json.loads(value)
            rows.append(Row(mapping))
        return Result(rows, rowcount)


async def _no_reset(_conn: Any) -> None:
    """Pool release without RESET ALL / UNLISTEN * (a round trip per release).

    Nothing in the data layer sets session state, listens, or takes advisory
    locks on a pooled connection; an open transaction is still rolled back.
    """


# ---------------------------------------------------------------- the database


class _LazyPool:
    """An asyncpg pool opened on first use (a Database made at import opens nothing)."""

    def __init__(self, url: str, max_size: int, **server_settings: str) -> None:
        self.url = url
        self.max_size = max_size
        self.server_settings = server_settings
        self.pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        if self.pool is None:
            async with self._lock:
                if self.pool is None:
                    self.pool = await asyncpg.create_pool(
                        self.url,
                        min_size=0,
                        max_size=self.max_size,
                        max_inactive_connection_lifetime=POOL_IDLE_S,
                        reset=_no_reset,
                        statement_cache_size=STATEMENTS_PER_CONNECTION,
                        server_settings=self.server_settings or None,
                    )
        return self.pool

    async def close(self) -> None:
        pool = self.pool
        if pool is None:
            return
        # Forgotten only once closed: work arriving meanwhile gets the closing pool's
        # error instead of opening a new pool that nothing would close.
        try:
            await asyncio.wait_for(pool.close(), DISPOSE_WAIT_S)
        except Exception:
            pool.terminate()
        self.pool = None


class Database:
    """One asyncpg pool (the data layer) and one SQLAlchemy engine (ORM sessions) per process."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        self.url = libpq_url(url)
        self.max_size = max(1, pool_size + max_overflow)
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=min(pool_size, 2),
            max_overflow=max(0, pool_size + max_overflow - 2),
            pool_pre_ping=False,
            # A connection broken by a Postgres restart is dropped, not reused.
            pool_recycle=3600,
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._pool = _LazyPool(self.url, self.max_size)
        self._claim_pool = _LazyPool(self.url, CLAIM_CONNECTIONS, **CLAIM_PLANNER_SETTINGS)
        self._shielded: set[asyncio.Task[object]] = set()

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[StatementRunner]:
        """A pooled connection where each statement commits by itself.

        For work that is one statement (or reads that need no common snapshot):
        no BEGIN/COMMIT round trips.
        """
        pool = await self._pool.get()
        async with pool.acquire() as conn:
            yield StatementRunner(conn)

    @contextlib.asynccontextmanager
    async def claiming(self) -> AsyncIterator[StatementRunner]:
        """An autocommit connection for claim statements (`CLAIM_PLANNER_SETTINGS`)."""
        pool = await self._claim_pool.get()
        async with pool.acquire() as conn:
            yield StatementRunner(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StatementRunner]:
        """A pooled connection in a transaction, committed at the end (rolled back on error)."""
        pool = await self._pool.get()
        async with pool.acquire() as conn, conn.transaction():
            yield StatementRunner(conn)

    @contextlib.asynccontextmanager
    async def rolled_back(self) -> AsyncIterator[StatementRunner]:
        """A pooled connection in a transaction that is always rolled back (a dry run)."""
        pool = await self._pool.get()
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                yield StatementRunner(conn)
            finally:
                await tx.rollback()

    def session(self) -> AsyncSession:
        """A new ORM session; use as `async with db.session() as s, s.begin(): …`."""
        return self._sessions()

    def pool_stats(self) -> tuple[int, int]:
        """(connections in use, connections open) of the data-layer pool."""
        pool = self._pool.pool
        if pool is None:
            return 0, 0
        size = pool.get_size()
        return size - pool.get_idle_size(), size

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
        async with self.autocommit() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        """Wait (briefly) for shielded work still running, then close every pooled connection."""
        if self._shielded:
            await asyncio.wait(list(self._shielded), timeout=DISPOSE_WAIT_S)
        await self._pool.close()
        await self._claim_pool.close()
        await self.engine.dispose()
