"""Server interceptors, one concern each: request id + access log, error mapping, parsing.

(Authentication lives in control.auth.) Each interceptor is a `ScopeInterceptor`:
it wraps every handler of every kind (unary or streaming, either side) in one
async context manager, `scope(details, context)`, entered before the handler
runs and left after it ends, whatever way it ends. `MalformedRequestInterceptor`
is the exception: it changes how requests are parsed (see there).
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing, asynccontextmanager
from typing import Any

import grpc

from control.errors import (
    InvalidArgument,
    SpoolError,
    abort_with,
    internal_status,
    is_database_unavailable,
    to_status,
    unavailable_status,
)
from control.logs import request_id_var

log = logging.getLogger("spool.rpc")

REQUEST_ID_HEADER = "x-request-id"

Scope = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]], scope: Scope) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with scope(context):
            return await behavior(request, context)

    return wrapped


def _wrap_stream_response(behavior: Callable[..., Any], scope: Scope) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        # A streaming handler written with `await context.write(…)` is a coroutine.
        return _wrap_unary_response(behavior, scope)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with scope(context), aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return wrapped


def wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """The same handler with its behavior run inside `scope(context)`."""
    if handler.unary_unary:
        return handler._replace(unary_unary=_wrap_unary_response(handler.unary_unary, scope))
    if handler.stream_unary:
        return handler._replace(stream_unary=_wrap_unary_response(handler.stream_unary, scope))
    if handler.unary_stream:
        return handler._replace(unary_stream=_wrap_stream_response(handler.unary_stream, scope))
    return handler._replace(stream_stream=_wrap_stream_response(handler.stream_stream, scope))


class ScopeInterceptor(grpc.aio.ServerInterceptor):
    """Base: subclasses implement `scope(details, context)` as an async context manager."""

    def scope(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext
    ) -> AbstractAsyncContextManager[None]:
        """The context the handler runs in."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler gRPC found for this call (None: unknown method, left alone).

        The wrapped handler of a method is built once and reused (with what the
        interceptors inside it built): a scope sees only `details.method`, and
        reads everything about the call itself from its context.
        """
        cache = self.__dict__.setdefault("_wrapped_handlers", {})
        return await _wrapped_once(cache, continuation, handler_call_details, self.scope)


async def _wrapped_once(
    cache: dict[str, grpc.RpcMethodHandler],
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
    handler_call_details: grpc.HandlerCallDetails,
    scope: Callable[[MethodDetails, grpc.aio.ServicerContext], AbstractAsyncContextManager[None]],
) -> grpc.RpcMethodHandler:
    """The method's handler run inside `scope`, built on its first call and kept in `cache`."""
    method = handler_call_details.method
    wrapped = cache.get(method)
    if wrapped is None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        details = MethodDetails(method)
        wrapped = wrap_handler(handler, lambda context: scope(details, context))
        cache[method] = wrapped
    return wrapped


class ScopeChain(grpc.aio.ServerInterceptor):
    """Several ScopeInterceptors as one: their scopes nested (first outermost) in ONE wrapper.

    Same behaviour as installing them one after another, but a streamed
    message passes one wrapping generator instead of one per interceptor (a
    progress event fanned out to a thousand watchers is a thousand messages).
    """

    def __init__(self, *interceptors: ScopeInterceptor) -> None:
        self.interceptors = interceptors
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    @asynccontextmanager
    async def _scopes(self, details: MethodDetails, context: grpc.aio.ServicerContext):
        async with AsyncExitStack() as stack:
            for interceptor in self.interceptors:
                await stack.enter_async_context(interceptor.scope(details, context))
            yield

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler inside every scope (built once per method)."""
        return await _wrapped_once(self._wrapped, continuation, handler_call_details, self._scopes)


class MethodDetails:
    """What a scope may know of the call's details: the method (the same for every call)."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return default


class RequestIdInterceptor(ScopeInterceptor):
    """Gives each RPC a request id (the caller's x-request-id or a new one) and logs it.

    The id is echoed in the trailing metadata, set on every log record written
    while the RPC runs, and the RPC's end is logged with its status and duration.
    """

    @asynccontextmanager
    async def scope(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Run the handler with a request id; log one access line when it ends."""
        request_id = ""
        for name, value in context.invocation_metadata() or ():
            if name == REQUEST_ID_HEADER:
                request_id = str(value)[:128]
        request_id = request_id or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        started = time.perf_counter()
        outcome = "OK"
        try:
            yield
        except BaseException:
            outcome = "CANCELLED"
            raise
        finally:
            code = _code_name(context, outcome)
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            log.log(
                logging.INFO if code != "INTERNAL" else logging.WARNING,
                "rpc",
                extra={"fields": {"method": details.method, "code": code, "ms": elapsed_ms}},
            )
            request_id_var.reset(token)


class ErrorInterceptor(ScopeInterceptor):
    """Turns SpoolError into its status; anything unexpected into INTERNAL (logged)."""

    @asynccontextmanager
    async def scope(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Translate exceptions escaping the handler."""
        try:
            yield
        except SpoolError as exc:
            await abort_with(context, to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if is_database_unavailable(exc):
                # An outage, not a bug: the caller may retry; one line, no traceback.
                log.warning(
                    "database unavailable in %s: %s: %s",
                    details.method,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "",
                )
                await abort_with(context, unavailable_status())
            log.exception("unexpected error in %s", details.method)
            await abort_with(context, internal_status())


class _Malformed:
    """Stands in for a request message whose bytes could not be parsed."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        """The INVALID_ARGUMENT the caller gets (no parser class names, no offsets)."""
        return InvalidArgument("request", f"not a valid {self.type_name} message")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, but returning a `_Malformed` instead of raising."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "protobuf")

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return _Malformed(type_name)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The request stream, raising InvalidArgument at the first malformed message."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.error()
        yield request


def _refuse_unary(behavior: Callable[..., Any]) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                raise request.error()
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            raise request.error()
        return await behavior(request, context)

    return unary


def _refuse_stream(behavior: Callable[..., Any]) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with aclosing(behavior(_checked(requests), context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_checked(requests), context)

    return unary


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Malformed request bytes → INVALID_ARGUMENT "request: not a valid <type> message".

    grpc.aio calls the handler's `request_deserializer` itself: when it raises,
    a unary request gets UNKNOWN with the parser's exception class in the
    message, and a streamed one surfaces as an unexpected error (INTERNAL).
    So the deserializer is replaced by one that hands a `_Malformed` marker
    to the handler instead, and the handler is wrapped to raise InvalidArgument
    for it (for streams: at the malformed message, as the handler reads it).
    Installed innermost, so the error interceptor maps that InvalidArgument
    and authentication still comes first.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The handler with a tolerant deserializer and a check of what it parsed (built once
        per method)."""
        method = handler_call_details.method
        cache = self.__dict__.setdefault("_tolerant_handlers", {})
        cached = cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cache[method] = handler = self._tolerant_handler(handler)
        return handler

    @staticmethod
    def _tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_refuse_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_refuse_unary(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_refuse_stream(handler.stream_unary))
        return handler._replace(stream_stream=_refuse_stream(handler.stream_stream))
