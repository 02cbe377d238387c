"""Assembles a control plane: database, notifier, servicers, interceptors, background tasks.

`start_server(settings)` returns a running `ControlPlane`. The gRPC port opens
first with health NOT_SERVING; once migrations ran and the database answers,
background components start and health turns SERVING. `await cp.stop(grace)`
turns health NOT_SERVING, lets in-flight RPCs finish, then stops everything.

To add a service: register its servicer in `_register_servicers` and, if it
has background loops, an object with `async start()` / `async stop()` in
`_components` (started after migrations, stopped before the database closes).

With `metrics_port` set, Prometheus `/metrics` (control.metrics) opens with the
gRPC port; its queue gauges are refreshed by a component once the database is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control import auth, metrics, migrations
from control.config import Settings
from control.db import Database
from control.embedded import EmbeddedPostgres
from control.interceptors import (
    ErrorInterceptor,
    MalformedRequestInterceptor,
    RequestIdInterceptor,
    ScopeChain,
)
from control.notify import Notifier
from control.servicers.blob_service import BlobService
from control.servicers.job_service import JobService, assigned_job_to_proto
from control.servicers.worker_service import WorkerService
from control.services.blobs import BlobCollector, Blobs
from control.services.dispatch import Dispatcher
from control.services.leases import LeaseEnforcers
from control.sweeper import JobCountsFolder, RetentionSweeper
from spool.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

log = logging.getLogger(__name__)

#: pause between attempts to reach the database while not ready
READY_RETRY_S = 1.0
#: overall health entry ("") and one per service
HEALTH_OVERALL = ""


class Component(Protocol):
    """A background part of the control plane (loops, sweepers)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ControlPlane:
    """A running control plane process (or an in-process one in tests)."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    db: Database
    notifier: Notifier
    replica_id: str
    health: health.aio.HealthServicer
    embedded: EmbeddedPostgres | None = None
    #: connections of their own for dispatch (claims, worker outcomes, leases), so a
    #: crowd of watchers and API calls never makes the claim loop wait for one
    dispatch_db: Database | None = None
    components: list[Component] = field(default_factory=list)
    #: the components whose start() returned (stopped in reverse order)
    started: list[Component] = field(default_factory=list)
    service_names: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: the port of the /metrics endpoint this control plane started (0: none)
    metrics_port: int = 0
    _ready_task: asyncio.Task[None] | None = None
    _stopped: bool = False

    @property
    def ready_task(self) -> asyncio.Task[None]:
        """The start-up task (migrate, reach the database, start components, SERVING)."""
        assert self._ready_task is not None
        return self._ready_task

    @property
    def address(self) -> str:
        """host:port a client can dial."""
        host = self.settings.host
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (HEALTH_OVERALL, *self.service_names):
            await self.health.set(name, status)

    async def wait_ready(self, wait_s: float | None = None) -> None:
        """Wait until migrations ran and background components started."""
        await asyncio.wait_for(self.ready.wait(), wait_s)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, finish in-flight RPCs within `grace`, stop the rest."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        with contextlib.suppress(Exception):
            await self.set_serving(False)
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ready_task
        # Components stop first so open streams (e.g. workers) see the server leave.
        for component in reversed(self.started):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)
        await self.server.stop(grace)
        metrics.shutdown(self.metrics_port)
        await self.notifier.stop()
        await self.dispose_databases()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        log.info("control plane stopped")

    async def dispose_databases(self) -> None:
        """Close both connection pools."""
        if self.dispatch_db is not None:
            await self.dispatch_db.dispose()
        await self.db.dispose()


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """gRPC channel arguments: message sizes and keepalive (dead peers noticed in seconds)."""
    keepalive_ms = int(settings.keepalive_s * 1000)
    timeout_ms = int(settings.keepalive_timeout_s * 1000)
    return [
        # A taken port is an error, not a second server sharing it unnoticed.
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 5 s without being told GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (None: plaintext)."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise ValueError("SPOOL_TLS_CLIENT_CA needs SPOOL_TLS_CERT and SPOOL_TLS_KEY")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ValueError("TLS needs both SPOOL_TLS_CERT and SPOOL_TLS_KEY")
    cert = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _keys(settings: Settings) -> auth.KeyStore | None:
    if not settings.auth:
        return None
    keys = auth.load_keys(settings.api_keys_file, settings.api_keys)
    if not len(keys):
        log.warning("auth is on but no API keys are configured: every call will be refused")
    return keys


def _register_servicers(cp: ControlPlane, server: grpc.aio.Server) -> None:
    """Every servicer of the control plane (and its background components)."""
    job_service = JobService(cp.db, cp.notifier, cp.settings)
    job_service_pb2_grpc.add_JobServiceServicer_to_server(job_service, server)
    cp.service_names.append(job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name)
    cp.components += [RetentionSweeper(cp.db, cp.settings), JobCountsFolder(cp.db)]
    if cp.settings.metrics_port > 0:
        # The queue gauges come from GetStats' own code, over every tenant.
        async def read_stats() -> dict[str, Any]:
            stats = await job_service.jobs.stats(None)
            return {
                "by_state": stats.totals,
                "queue_depth": stats.queue_depth,
                "oldest_queued_age_s": stats.oldest_queued_age.total_seconds(),
                "connected_workers": stats.connected_workers,
            }

        cp.components.append(
            metrics.MetricsRefresher(read_stats, cp.db, cp.settings.metrics_refresh_s)
        )
    # Blobs (C2): the content store, its service and the blob collector.
    blobs = Blobs(cp.db, cp.settings)
    blob_service_pb2_grpc.add_BlobServiceServicer_to_server(BlobService(blobs), server)
    cp.service_names.append(blob_service_pb2.DESCRIPTOR.services_by_name["BlobService"].full_name)
    cp.components.append(BlobCollector(blobs))
    # Workers (B2): the Connect stream, its claim loop, and the lease/deadline/cancel enforcers.
    dispatch_db = cp.dispatch_db or cp.db
    dispatcher = Dispatcher(dispatch_db, cp.notifier, cp.settings, cp.replica_id)
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(
        WorkerService(dispatcher, assigned_job_to_proto), server
    )
    cp.service_names.append(
        worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
    )
    cp.components += [dispatcher, LeaseEnforcers(dispatch_db, cp.settings, dispatcher.replica_id)]


async def _become_ready(cp: ControlPlane, migrate: Callable[[], Awaitable[None]]) -> None:
    """Migrate and reach the database (retrying), start components, then SERVING."""
    while True:
        try:
            await migrate()
            await cp.db.ping()
            await cp.notifier.start()
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("database not ready (%s); retrying", exc)
            await asyncio.sleep(READY_RETRY_S)
    for component in cp.components:
        await component.start()
        cp.started.append(component)
    cp.ready.set()
    await cp.set_serving(True)
    log.info("control plane serving on %s", cp.address)


async def start_server(
    settings: Settings, *, wait_ready: bool = True, run_migrations: bool = True
) -> ControlPlane:
    """Start a control plane; with `wait_ready`, return once it is SERVING."""
    credentials = server_credentials(settings)  # bad TLS files fail before anything starts
    embedded = None
    url = settings.database_url
    if not url:
        embedded = EmbeddedPostgres(Path(settings.data_dir) / "pg")
        await asyncio.to_thread(embedded.start)
        url = embedded.url()
    db = Database(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    dispatch_db = None
    if settings.db_dispatch_pool_size > 0:
        size = settings.db_dispatch_pool_size
        dispatch_db = Database(url, pool_size=size, max_overflow=size)
    notifier = Notifier(db.url)

    interceptors = [
        # One wrapper for the three scopes (request id + access log, outermost; auth;
        # error mapping), in that order.
        ScopeChain(
            RequestIdInterceptor(), auth.AuthInterceptor(_keys(settings)), ErrorInterceptor()
        ),
        # Innermost: its INVALID_ARGUMENT for unparsable bytes goes through the error mapping.
        MalformedRequestInterceptor(),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    cp = ControlPlane(
        settings=settings,
        server=server,
        port=0,
        db=db,
        notifier=notifier,
        replica_id=uuid.uuid4().hex[:12],
        health=health_servicer,
        embedded=embedded,
        dispatch_db=dispatch_db,
    )
    _register_servicers(cp, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await cp.set_serving(False)
    if settings.reflection:
        reflection.enable_server_reflection(
            [*cp.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    try:
        if metrics.serve(settings.metrics_port, settings.metrics_addr):
            cp.metrics_port = settings.metrics_port
    except OSError as exc:
        await cp.dispose_databases()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise RuntimeError(
            f"cannot serve metrics on {settings.metrics_addr}:{settings.metrics_port}: {exc}"
        ) from exc
    try:
        if credentials is None:
            cp.port = server.add_insecure_port(settings.listen)
        else:
            cp.port = server.add_secure_port(settings.listen, credentials)
        await server.start()
    except Exception as exc:
        metrics.shutdown(cp.metrics_port)
        await cp.dispose_databases()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise RuntimeError(f"cannot listen on {settings.listen}: {exc}") from exc
    log.info(
        "listening on %s (auth %s, %s)",
        cp.address,
        "on" if settings.auth else "off",
        "plaintext" if credentials is None else "TLS",
    )

    async def migrate() -> None:
        if run_migrations:
            await migrations.upgrade(url)

    cp._ready_task = asyncio.create_task(_become_ready(cp, migrate), name="control.ready")
    if wait_ready:
        ready = asyncio.ensure_future(cp.ready.wait())
        await asyncio.wait({ready, cp._ready_task}, return_when=asyncio.FIRST_COMPLETED)
        if not cp.ready.is_set():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
            await cp.stop(0)
            cp._ready_task.result()  # re-raise what stopped it
    return cp
