"""control.errors.is_database_unavailable: outages are retryable, bugs are not.

The real outage (a Postgres stopped and started under a control plane) is in
test_db_outage.py; this checks the classes it cannot provoke on demand (a pool
timeout, an admin shutdown mid-query) and the ones that must stay INTERNAL.
"""

from __future__ import annotations

import asyncpg.exceptions as pg
import pytest
import sqlalchemy.exc as sa_exc

from control.errors import is_database_unavailable


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("SELECT 1", {}, orig, connection_invalidated=invalidated)


def _raised_from(exc: BaseException) -> BaseException:
    """`exc` with a traceback that does not pass through the database driver."""
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "exc",
    [
        sa_exc.TimeoutError("QueuePool limit of size 2 overflow 0 reached"),
        sa_exc.DisconnectionError("gone"),
        _wrapped(Exception("x"), invalidated=True),
        _wrapped(pg.AdminShutdownError("terminating connection due to administrator command")),
        _wrapped(pg.CannotConnectNowError("the database system is starting up")),
        _wrapped(pg.ConnectionDoesNotExistError("connection was closed in the middle")),
        _wrapped(pg.TooManyConnectionsError("too many clients")),
        _wrapped(pg.InterfaceError("connection is closed")),
        pg.CrashShutdownError("crash"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "reset"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_outages(exc: BaseException) -> None:
    assert is_database_unavailable(exc)


def test_an_outage_behind_another_error() -> None:
    try:
        try:
            raise pg.AdminShutdownError("terminating connection")
        except pg.AdminShutdownError as inner:
            raise RuntimeError("while applying") from inner
    except RuntimeError as outer:
        assert is_database_unavailable(outer)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        _wrapped(pg.UniqueViolationError("duplicate key")),
        _wrapped(pg.QueryCanceledError("canceling statement due to statement timeout")),
        _wrapped(pg.InterfaceError("cannot perform operation: another operation is in progress")),
        _raised_from(FileNotFoundError(2, "No such file or directory")),  # a blob file
        _raised_from(TimeoutError()),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_not_outages(exc: BaseException) -> None:
    assert not is_database_unavailable(exc)
