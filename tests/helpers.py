"""Shared test helpers: keys, a control plane in the test process, channels, waiting.

Import as `from helpers import …` (pytest puts tests/ on sys.path).

    async with running_control_plane(database_url, lease_s=2.0) as cp:
        async with open_channel(cp.address, TENANT_A_KEY) as channel:
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            await jobs.Submit(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from control.config import Settings
from control.server import ControlPlane, start_server

TENANT_A_KEY = "test-key-acme"
TENANT_B_KEY = "test-key-globex"
#: a worker key (tenant "acme"): may call WorkerService and BlobService only
WORKER_KEY = "test-key-worker"
#: a worker key of tenant "globex" (its workers run only globex's jobs)
WORKER_B_KEY = "test-key-worker-globex"
#: a shared fleet's worker key (tenant "*": its workers run every tenant's jobs)
FLEET_KEY = "test-key-fleet"
TENANT_A = "acme"
TENANT_B = "globex"
API_KEYS = ",".join(
    [
        f"{TENANT_A_KEY}:{TENANT_A}:client",
        f"{TENANT_B_KEY}:{TENANT_B}:client",
        f"{WORKER_KEY}:{TENANT_A}:worker",
        f"{WORKER_B_KEY}:{TENANT_B}:worker",
        f"{FLEET_KEY}:*:worker",
    ]
)


async def wait_until(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,  # noqa: ASYNC109 (the contract's name; polls, no I/O)
    interval: float = 0.02,
    message: str = "",
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that.

    Raises AssertionError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


def test_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for an in-process control plane: free port, auth on with the test keys."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "auth": True,
        "api_keys": API_KEYS,
        "api_keys_file": "",
        "shutdown_grace_s": 1.0,
        "log_format": "text",
    }
    base.update(overrides)
    return Settings(**base)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test


@contextlib.asynccontextmanager
async def running_control_plane(database_url: str, **overrides: Any) -> AsyncIterator[ControlPlane]:
    """A SERVING control plane on a free port (auth on with the test keys); stopped after."""
    cp = await start_server(test_settings(database_url, **overrides))
    try:
        yield cp
    finally:
        await cp.stop(grace=overrides.get("shutdown_grace_s", 1.0))


class _AuthHeader:
    """Adds `authorization: Bearer <key>` to every call (one subclass per call kind,
    because grpc.aio files each interceptor under the first kind it matches)."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return details._replace(metadata=metadata)


class _AuthUnaryUnary(_AuthHeader, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


class _AuthUnaryStream(_AuthHeader, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


class _AuthStreamUnary(_AuthHeader, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request_iterator)


class _AuthStreamStream(_AuthHeader, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request_iterator)


def auth_interceptors(key: str) -> list[Any]:
    """Client interceptors sending `key` on every kind of call."""
    kinds = (_AuthUnaryUnary, _AuthUnaryStream, _AuthStreamUnary, _AuthStreamStream)
    return [kind(key) for kind in kinds]


def make_channel(address: str, key: str | None = TENANT_A_KEY) -> grpc.aio.Channel:
    """An insecure aio channel to `address` sending `key` on every call (None: no key).

    The caller closes it (`await channel.close()`); prefer `open_channel`.
    """
    interceptors = auth_interceptors(key) if key else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


@contextlib.asynccontextmanager
async def open_channel(
    address: str, key: str | None = TENANT_A_KEY
) -> AsyncIterator[grpc.aio.Channel]:
    """`make_channel` as an async context manager that closes the channel."""
    channel = make_channel(address, key)
    try:
        yield channel
    finally:
        await channel.close()
