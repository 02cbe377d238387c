"""One exception root for the control plane, and its translation to gRPC statuses.

Services and servicers raise these; the error interceptor (control.interceptors)
turns them into a status with `google.rpc.Status` details (BadRequest field
violations for InvalidArgument, ErrorInfo with a reason for the rest). Anything
else becomes INTERNAL with a generic message while the traceback goes to the log.
"""

from __future__ import annotations

import asyncpg.exceptions as pg
import grpc
import sqlalchemy.exc as sa_exc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "spool.dev"


class SpoolError(Exception):
    """Root of every error the control plane reports to a caller on purpose."""

    code = grpc.StatusCode.UNKNOWN
    #: short UPPER_SNAKE reason for ErrorInfo
    default_reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(SpoolError):
    """A request field is malformed; `field` is its path, e.g. "job.priority"."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(SpoolError):
    """The thing does not exist, or belongs to another tenant."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class FailedPrecondition(SpoolError):
    """The thing is not in a state that allows this."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class AlreadyExists(SpoolError):
    """A different thing already carries this identity (e.g. a reused request_id)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Unauthenticated(SpoolError):
    """No credentials, or unknown ones."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(SpoolError):
    """Known credentials that may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(SpoolError):
    """A quota or size limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(exc: SpoolError) -> grpc.Status:
    """The gRPC status (code, message, google.rpc.Status details) for a SpoolError."""
    details = []
    if isinstance(exc, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=exc.field, description=exc.description
                        )
                    ]
                )
            )
        )
    details.append(_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN)))
    status = status_pb2.Status(
        code=getattr(code_pb2, exc.code.name), message=exc.message, details=details
    )
    return rpc_status.to_status(status)


#: what a caller is told while the database cannot be reached (the cause goes to the log)
UNAVAILABLE_MESSAGE = "database unavailable; retry later"
#: the modules whose OSErrors and timeouts mean "the database cannot be reached"
_DATABASE_MODULES = ("asyncpg", "sqlalchemy")
#: asyncpg errors that mean the server is gone, going, not there yet, or full
_PG_OUTAGE = (
    pg.PostgresConnectionError,  # class 08: connection does not exist, failure, ...
    pg.OperatorInterventionError,  # 57P01 admin shutdown, 57P02 crash, 57P03 cannot connect now
    pg.TooManyConnectionsError,
)
#: how many causes (__cause__ / __context__ / .orig) are followed
_CHAIN_LIMIT = 8


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps: SQLAlchemy's `.orig`, then `__cause__` / `__context__`."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _CHAIN_LIMIT:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        for nxt in (getattr(e, "orig", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _raised_by_database_driver(exc: BaseException) -> bool:
    """True when `exc` travelled through asyncpg or SQLAlchemy on its way up.

    (A unix socket that is gone while Postgres restarts is a FileNotFoundError
    raised by asyncio under asyncpg's connect; the same error from a blob file
    never passes through the driver.)
    """
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if any(f"{part}/" in name or f"{part}\\" in name for part in _DATABASE_MODULES):
            return True
        tb = tb.tb_next
    return False


def is_database_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached now (retrying later may work).

    Connection-level failures only, never a bad statement: SQLAlchemy's
    DBAPIError marked `connection_invalidated`, its pool TimeoutError and
    DisconnectionError; asyncpg's connection errors (class 08), operator
    intervention (admin / crash shutdown, cannot connect now), too many
    connections, an InterfaceError on a closed connection; and a
    ConnectionError / OSError / TimeoutError raised from inside the driver
    (refused, reset, a missing unix socket while the server restarts).
    """
    for e in _chain(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, sa_exc.TimeoutError | sa_exc.DisconnectionError):
            return True
        # (OperatorInterventionError also covers query_canceled, 57014: not an outage.)
        if isinstance(e, _PG_OUTAGE) and not isinstance(e, pg.QueryCanceledError):
            return True
        if isinstance(e, pg.InterfaceError) and "connection" in str(e) and "closed" in str(e):
            return True
        if isinstance(e, ConnectionError):
            return True
        if isinstance(e, OSError | TimeoutError) and _raised_by_database_driver(e):
            return True
    return False


#: SQLSTATE classes that blame the values of a statement, not the connection:
#: 22 data exception (out of range, bad text or JSON), 23 integrity constraint,
#: 54 program limit exceeded
_BAD_VALUE_SQLSTATE_CLASSES = ("22", "23", "54")


def is_bad_value(exc: BaseException) -> bool:
    """True when `exc` says a statement's values cannot be stored or computed.

    Such an error repeats however often the statement is retried, unlike a
    lost connection or a restarting server: the caller should refuse the
    offending item alone instead of retrying. Python-side conversion errors
    (an out-of-range datetime decoded from a row, a value the driver cannot
    encode) count too.
    """
    if is_database_unavailable(exc):
        return False
    chain = _chain(exc)
    for e in chain:
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate:
            return sqlstate[:2] in _BAD_VALUE_SQLSTATE_CLASSES
    return any(isinstance(e, OverflowError | UnicodeError | ValueError | TypeError) for e in chain)


def unavailable_status() -> grpc.Status:
    """The status for a database outage: UNAVAILABLE, retryable, nothing about the cause."""
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message=UNAVAILABLE_MESSAGE,
            details=[
                _pack(
                    error_details_pb2.ErrorInfo(reason="DATABASE_UNAVAILABLE", domain=ERROR_DOMAIN)
                )
            ],
        )
    )


def internal_status() -> grpc.Status:
    """The status for an unexpected exception: INTERNAL, nothing about the cause."""
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error (see server log)")
    )


async def abort(context: grpc.aio.ServicerContext, exc: SpoolError) -> None:
    """End the RPC with `exc`'s status (raises, like context.abort)."""
    await abort_with(context, to_status(exc))


async def abort_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """End the RPC with `status`, keeping trailing metadata already set (e.g. x-request-id)."""
    metadata = tuple(status.trailing_metadata) + tuple(context.trailing_metadata() or ())
    await context.abort(status.code, status.details, metadata)
