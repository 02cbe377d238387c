"""Typed errors of the Spool client, mapped from gRPC status codes.

Every error the client raises on purpose is a `SpoolError`; catch that to
handle them all. The control plane attaches `google.rpc.Status` details:
`InvalidArgument.field` comes from a `BadRequest` field violation, and
`SpoolError.reason` from an `ErrorInfo`.

    try:
        client.get("not-a-uuid")
    except errors.InvalidArgument as exc:
        print(exc.field, exc.description)   # job_id  must be a UUID
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

#: trailing metadata key carrying the serialized google.rpc.Status
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class SpoolError(Exception):
    """Root of every error the client raises on purpose."""

    #: the gRPC status code behind the error (UNKNOWN when it did not come from a call)
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        #: short UPPER_SNAKE reason from the server's ErrorInfo, when it sent one
        self.reason = reason
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SpoolError):
    """A request field was rejected; `field` names it (e.g. "job.priority")."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str, *, reason: str = "") -> None:
        message = f"{field}: {description}" if field else description
        super().__init__(message, reason=reason)
        self.field = field
        self.description = description


class NotFound(SpoolError):
    """The job or blob does not exist (or belongs to another tenant)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SpoolError):
    """Something else already carries this identity (e.g. a reused request_id)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SpoolError):
    """The job is not in a state that allows this (e.g. deleting a running job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(SpoolError):
    """No API key was sent, or an unknown one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SpoolError):
    """The API key may not call this (e.g. a worker key on JobService)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SpoolError):
    """A quota, rate or size limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SpoolError):
    """The control plane could not be reached (after the client's retries)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SpoolError):
    """A call took longer than its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WaitTimeout(SpoolError, TimeoutError):
    """`wait()` gave up before the job reached a terminal state."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(SpoolError):
    """A downloaded blob's content does not match its sha256."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[SpoolError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def _status_details(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the server attached to a failed call, if any."""
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed detail must not hide the real error
                return None
            return status
    return None


def from_rpc_error(err: grpc.RpcError) -> SpoolError:
    """The typed error for a failed gRPC call (status code + google.rpc details)."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = (details_fn() if callable(details_fn) else "") or code.name
    reason = ""
    field = ""
    description = message
    status = _status_details(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
                    description = bad.field_violations[0].description
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(field, description, reason=reason)
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message, reason=reason)
    return SpoolError(f"{code.name}: {message}", reason=reason, code=code)
