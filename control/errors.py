"""One exception root for the control plane, and its translation to gRPC statuses.

Services and servicers raise these; the error interceptor (control.interceptors)
turns them into a status with `google.rpc.Status` details (BadRequest field
violations for InvalidArgument, ErrorInfo with a reason for the rest). Anything
else becomes INTERNAL with a generic message while the traceback goes to the log.
"""

from __future__ import annotations

import grpc
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
