"""A scripted WorkerService peer for the worker tests: a real grpc.aio server on port 0.

It is not the control plane: it welcomes, hands out queued jobs only against
announced credits, records everything the worker sends and lets a test push
Cancel/Drain. It checks the credit rule on every message: credits announced
and not yet used plus attempts running never exceed the worker's slots.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2

from spool.v1 import job_pb2, worker_service_pb2, worker_service_pb2_grpc

Resp = worker_service_pb2.ConnectResponse


def make_job(job_type: str = "debug.sleep", params: dict | None = None, **kw: Any) -> job_pb2.Job:
    """A Job message as control would assign it."""
    p = struct_pb2.Struct()
    p.update(params or {})
    return job_pb2.Job(
        id=str(uuid.uuid4()), tenant="acme", type=job_type, params=p, attempt=1, **kw
    )


@dataclass
class PeerStream:
    """One Connect stream as the peer saw it."""

    hello: worker_service_pb2.ConnectRequest.Hello | None = None
    received: list[tuple[float, worker_service_pb2.ConnectRequest]] = field(default_factory=list)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    credits: int = 0
    closed: bool = False
    #: the worker's side of the stream ended (read to its end)
    half_closed: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    auth: dict[str, list[bytes]] = field(default_factory=dict)


class FakeControl(worker_service_pb2_grpc.WorkerServiceServicer):
    """The scripted peer; `start()` binds a port, `stop()` ends every stream."""

    def __init__(self, heartbeat_s: float = 0.2, lease_s: float = 5.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.streams: list[PeerStream] = []
        self.pending: deque[job_pb2.Job] = deque()
        #: (job_id, attempt) -> how the worker ended it ("completed", "failed", ...)
        self.results: dict[tuple[str, int], worker_service_pb2.ConnectRequest] = {}
        self.running: set[tuple[str, int]] = set()
        self.assigned_at: dict[tuple[str, int], float] = {}
        self.violations: list[str] = []
        #: acknowledge outcomes (as control does once committed); off to test resends
        self.ack_outcomes = True
        #: outcomes acknowledged, and outcomes received again before their Ack
        self.acked: set[tuple[str, int]] = set()
        self.resent: list[tuple[str, int]] = []
        self.slots = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0, tls: dict[str, bytes] | None = None) -> int:
        """Serve on 127.0.0.1:`port`; with `tls` (key, cert, ca PEMs) require client certs."""
        self.server = grpc.aio.server(
            options=[
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.http2.ping_timeout_ms", 5_000),
            ]
        )
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(self, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            creds = grpc.ssl_server_credentials(
                [(tls["key"], tls["cert"])], root_certificates=tls["ca"], require_client_auth=True
            )
            self.port = self.server.add_secure_port(f"127.0.0.1:{port}", creds)
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        for s in self.streams:
            if not s.closed:
                s.out.put_nowait(None)
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def current(self) -> PeerStream:
        return self.streams[-1]

    # -- what tests call ------------------------------------------------------
    def submit(self, job: job_pb2.Job) -> tuple[str, int]:
        """Queue a job; it is assigned as soon as the worker has a credit."""
        self.pending.append(job)
        self._dispatch()
        return (job.id, job.attempt)

    def cancel(self, key: tuple[str, int], grace_s: float = 5.0) -> None:
        grace = duration_pb2.Duration()
        grace.FromNanoseconds(int(grace_s * 1e9))
        self.current.out.put_nowait(
            Resp(
                cancel=Resp.Cancel(
                    ref=worker_service_pb2.AttemptRef(job_id=key[0], attempt=key[1]),
                    reason="test",
                    grace_period=grace,
                )
            )
        )

    def ack(self, key: tuple[str, int], applied: bool = True) -> None:
        """Acknowledge an attempt's outcome on the current stream."""
        self.acked.add(key)
        ref = worker_service_pb2.AttemptRef(job_id=key[0], attempt=key[1])
        self.current.out.put_nowait(
            Resp(ack=Resp.Ack(outcomes=[Resp.Ack.Outcome(ref=ref, applied=applied)]))
        )

    def drain(self) -> None:
        self.current.out.put_nowait(Resp(drain=Resp.Drain(reason="test")))

    def messages(self, kind: str, stream: PeerStream | None = None) -> list[Any]:
        """Every message of `kind` received (on one stream, or all), in order."""
        streams = [stream] if stream is not None else self.streams
        return [
            getattr(m, kind)
            for s in streams
            for _, m in s.received
            if m.WhichOneof("message") == kind
        ]

    # -- the servicer ---------------------------------------------------------
    async def Connect(self, request_iterator, context):
        stream = PeerStream(
            metadata={k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
            auth=dict(context.auth_context()),
        )
        self.streams.append(stream)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                msg = await stream.out.get()
                if msg is None:
                    return
                yield msg
        finally:
            stream.closed = True
            stream.credits = 0
            reader.cancel()

    async def _read(self, stream: PeerStream, request_iterator) -> None:
        try:
            async for req in request_iterator:
                stream.received.append((time.monotonic(), req))
                kind = req.WhichOneof("message")
                if kind == "hello":
                    stream.hello = req.hello
                    self.slots = req.hello.slots
                    # A reconnecting worker keeps the attempts it reports.
                    self.running = {(r.job_id, r.attempt) for r in req.hello.running} | {
                        k for k in self.running if k not in self.results
                    }
                    hb = duration_pb2.Duration()
                    hb.FromNanoseconds(int(self.heartbeat_s * 1e9))
                    lease = duration_pb2.Duration()
                    lease.FromNanoseconds(int(self.lease_s * 1e9))
                    stream.out.put_nowait(
                        Resp(
                            welcome=Resp.Welcome(
                                worker_id=req.hello.worker_id,
                                heartbeat_interval=hb,
                                lease_duration=lease,
                                control_replica="fake",
                            )
                        )
                    )
                elif kind == "ready":
                    stream.credits += req.ready.credits
                    if stream.credits + len(self.running) > self.slots:
                        self.violations.append(
                            f"credits {stream.credits} + running {len(self.running)} > {self.slots}"
                        )
                    self._dispatch()
                elif kind in ("completed", "failed", "canceled", "released"):
                    ref = getattr(req, kind).ref
                    key = (ref.job_id, ref.attempt)
                    if key in self.acked:
                        self.violations.append(f"result for {key} sent again after its Ack")
                    elif key in self.results:
                        self.resent.append(key)
                    self.results[key] = req
                    self.running.discard(key)
                    if self.ack_outcomes:
                        self.ack(key)
            stream.half_closed = True
        finally:
            # Like the real control plane: once the worker half-closes, end the stream.
            stream.out.put_nowait(None)

    def _dispatch(self) -> None:
        if not self.streams:
            return
        stream = self.current
        while stream.credits > 0 and self.pending and not stream.closed:
            job = self.pending.popleft()
            stream.credits -= 1
            key = (job.id, job.attempt)
            self.running.add(key)
            self.assigned_at[key] = time.monotonic()
            stream.out.put_nowait(Resp(assign=Resp.Assign(job=job, attempt=job.attempt)))


async def wait_until(cond, limit_s: float = 15.0, what: str = "condition") -> None:
    """Poll `cond()` (sync) every 10 ms until true; fail after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {limit_s}s")
        await asyncio.sleep(0.01)
