"""Helpers of the end-to-end tests: worker processes, a job client, database reads.

Control planes run in the test process (`running_control_plane`, auth on) with
short leases so failures resolve in seconds; workers are subprocesses
(`python -m worker.main`) speaking gRPC over loopback, killed and stopped with
real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from helpers import TENANT_A_KEY, WORKER_KEY, running_control_plane, wait_until

from spool.v1 import (
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent

#: short periods so lost leases and ignored cancels resolve in a couple of seconds
E2E_SETTINGS: dict[str, Any] = {
    "lease_s": 2.0,
    "heartbeat_s": 0.5,
    "cancel_grace_s": 1.5,
    "retry_backoff_base_s": 0.2,
    "retry_backoff_max_s": 1.0,
}
WORKER_TYPES = "debug.sleep,debug.noop,e2e.tick"

Req = worker_service_pb2.ConnectRequest
Ref = worker_service_pb2.AttemptRef


@contextlib.asynccontextmanager
async def control_plane(database_url: str, **overrides: Any) -> AsyncIterator[Any]:
    """A control plane with the e2e lease settings (overridable)."""
    async with running_control_plane(database_url, **{**E2E_SETTINGS, **overrides}) as cp:
        yield cp


class WorkerProcess:
    """One `spool-worker` subprocess; log in `log_path`."""

    def __init__(
        self,
        server: str,
        tmp: Path,
        *,
        worker_id: str | None = None,
        slots: int = 1,
        labels: str = "",
        types: str = WORKER_TYPES,
        token: str = WORKER_KEY,
        drain_grace_s: float = 1.0,
        prefetch: int = 0,
    ) -> None:
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        self.log_path = tmp / f"{self.worker_id}.log"
        env = {
            **os.environ,
            "SPOOL_SERVER": server,
            "SPOOL_TOKEN": token,
            "SPOOL_WORKER_ID": self.worker_id,
            "SPOOL_WORKER_NAME": self.worker_id,
            "SPOOL_WORKER_SLOTS": str(slots),
            "SPOOL_WORKER_PREFETCH": str(prefetch),
            "SPOOL_WORKER_LABELS": labels,
            "SPOOL_WORKER_TYPES": types,
            "SPOOL_WORKER_HANDLERS": "e2e_handlers",
            "SPOOL_WORKER_STATE_DIR": str(tmp / f"{self.worker_id}.state"),
            "SPOOL_WORKER_WORKDIR": str(tmp / f"{self.worker_id}.work"),
            "SPOOL_DRAIN_GRACE_S": str(drain_grace_s),
            "SPOOL_DEVICE": "cpu",
            "PYTHONPATH": os.pathsep.join([str(E2E_DIR), str(REPO)]),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.main"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def signal(self, sig: int) -> None:
        """Send a signal to the worker (and, for SIGSTOP/SIGCONT/SIGKILL, its slot children)."""
        targets = [self.proc.pid]
        if sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL):
            targets = _children(self.proc.pid) + targets
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def stop(self, wait_s: float = 10.0) -> None:
        """SIGTERM (drain), then SIGKILL if it takes too long; reap the process."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, wait_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        for pid in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    """Every descendant pid of `pid` (from /proc)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        path = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            kids = [int(x) for x in path.read_text().split()]
        except (OSError, ValueError):
            kids = []
        found.extend(kids)
        frontier.extend(kids)
    return found


class Workers:
    """Starts worker processes and always stops them at the end of the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[WorkerProcess] = []

    def start(self, cp: Any, **kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(cp.address, self.tmp, **kwargs)
        self.procs.append(w)
        return w

    async def stop_all(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.procs))


# ---------------------------------------------------------------------- client side


class Client:
    """A JobService client of one tenant on one control plane."""

    def __init__(self, address: str, key: str = TENANT_A_KEY) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {key}"),)

    async def close(self) -> None:
        await self.channel.close()

    async def submit(self, type: str, params: dict[str, Any] | None = None, **spec: Any):
        """Submit a job; `spec` takes JobSpec fields (durations and times as seconds)."""
        s = struct_pb2.Struct()
        s.update(params or {})
        for name in ("min_start_interval", "timeout"):
            if name in spec:
                d = duration_pb2.Duration()
                d.FromNanoseconds(int(spec.pop(name) * 1e9))
                spec[name] = d
        if "not_before" in spec:
            ts = timestamp_pb2.Timestamp()
            ts.FromNanoseconds(int(spec.pop("not_before") * 1e9))
            spec["not_before"] = ts
        req = job_service_pb2.SubmitRequest(job=job_pb2.JobSpec(type=type, params=s, **spec))
        return (await self.stub.Submit(req, metadata=self.md)).job

    async def get(self, job_id: str) -> job_pb2.Job:
        req = job_service_pb2.GetRequest(job_id=job_id)
        return (await self.stub.Get(req, metadata=self.md)).job

    async def cancel(self, job_id: str) -> job_pb2.Job:
        req = job_service_pb2.CancelRequest(job_id=job_id, reason="test")
        return (await self.stub.Cancel(req, metadata=self.md)).job

    async def state(self, job_id: str) -> int:
        return (await self.get(job_id)).state

    async def wait_state(self, job_id: str, state: int, wait_s: float = 15.0) -> job_pb2.Job:
        async def reached() -> bool:
            return (await self.state(job_id)) == state

        try:
            await wait_until(reached, timeout=wait_s)
        except AssertionError:
            job = await self.get(job_id)
            raise AssertionError(
                f"job {job_id} not in state {state} within {wait_s}s: state={job.state} "
                f"attempt={job.attempt}/{job.max_attempts} worker={job.worker_id!r} "
                f"error={job.error.code}:{job.error.message}"
            ) from None
        return await self.get(job_id)


# ------------------------------------------------------------------- database side


async def job_row(cp: Any, job_id: str) -> Any:
    async with cp.db.session() as s:
        return (await s.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})).one()


async def events(cp: Any, job_id: str | None = None) -> list[Any]:
    """job_events rows (of one job, or all), in order."""
    sql = "SELECT * FROM job_events"
    args: dict[str, Any] = {}
    if job_id is not None:
        sql += " WHERE job_id = CAST(:id AS uuid)"
        args["id"] = job_id
    async with cp.db.session() as s:
        return list(await s.execute(sa.text(sql + " ORDER BY job_id, seq"), args))


async def worker_connected(cp: Any, worker_id: str) -> bool:
    async with cp.db.session() as s:
        row = await s.execute(
            sa.text("SELECT connected FROM workers WHERE id = :id"), {"id": worker_id}
        )
        return bool(row.scalar())


async def wait_connected(cp: Any, *ws: WorkerProcess, wait_s: float = 30.0) -> None:
    """Wait until every worker said Hello (its row is connected)."""

    async def all_connected() -> bool:
        return all([await worker_connected(cp, w.worker_id) for w in ws])

    await wait_until(all_connected, timeout=wait_s)


def ticks(path: Path) -> int:
    """Lines an `e2e.tick` handler wrote so far."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


class RawWorker:
    """A worker played by the test: send what you like, read what comes."""

    def __init__(self, address: str, key: str = WORKER_KEY) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = worker_service_pb2_grpc.WorkerServiceStub(self.channel)
        self.outgoing: asyncio.Queue[Req | None] = asyncio.Queue()
        self.call = self.stub.Connect(
            self._requests(), metadata=(("authorization", f"Bearer {key}"),)
        )
        # Reads go through a queue: cancelling a pending call.read() would cancel the RPC.
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        #: Ack entries as they came ((job_id, attempt) -> the entry), kept apart from `incoming`
        self.acks: dict[tuple[str, int], Any] = {}
        #: the size of each Batch received (its messages go to `incoming` one by one)
        self.batches: list[int] = []
        self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for msg in self.call:
                if msg.WhichOneof("message") == "batch":
                    self.batches.append(len(msg.batch.messages))
                    for item in msg.batch.messages:
                        self._take(item)
                else:
                    self._take(msg)
        except grpc.aio.AioRpcError as exc:
            self.incoming.put_nowait(exc)
        except asyncio.CancelledError:
            pass

    def _take(self, msg: Any) -> None:
        if msg.WhichOneof("message") == "ack":
            for entry in msg.ack.outcomes:
                self.acks[(entry.ref.job_id, entry.ref.attempt)] = entry
        else:
            self.incoming.put_nowait(msg)

    async def _requests(self):
        while (msg := await self.outgoing.get()) is not None:
            yield msg

    def send(self, **kwargs: Any) -> None:
        self.outgoing.put_nowait(Req(**kwargs))

    def hello(
        self,
        worker_id: str,
        slots: int = 4,
        running=(),
        types=("debug.noop",),
        *,
        batches: bool = False,
        prefetch: int = 0,
    ) -> None:
        self.send(
            hello=Req.Hello(
                worker_id=worker_id,
                name=worker_id,
                job_types=list(types),
                slots=slots,
                running=[Ref(job_id=j, attempt=a) for j, a in running],
                accepts_batches=batches,
                prefetch=prefetch,
            )
        )

    async def read(self, wait_s: float = 10.0):
        msg = await asyncio.wait_for(self.incoming.get(), wait_s)
        if isinstance(msg, Exception):
            raise msg
        return msg

    async def read_kind(self, kind: str, wait_s: float = 10.0):
        msg = await self.read(wait_s)
        assert msg.WhichOneof("message") == kind, msg
        return getattr(msg, kind)

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()
