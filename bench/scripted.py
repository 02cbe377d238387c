"""A lightweight worker for bench.scale: one WorkerService.Connect stream, no processes.

Two hundred `spool-worker` processes (each with its slot processes) do not fit
on a 2-core machine beside the control plane they are meant to load, so the
fleet scenario plays its workers in the bench process. Each `ScriptedWorker`
speaks the real protocol over its own TCP connection, the way
`worker/agent.py` does: Hello, Ready(slots) after Welcome, a Heartbeat of the
attempts it holds every `heartbeat_interval`, per Assign a `debug.sleep`-like
run (a ProgressUpdate after each of `params.steps` steps over
`params.duration` seconds, stamped with `update_time`), then Completed and
Ready(1). Anything the control plane does that a healthy run should not
cause (a Cancel, a refused outcome, the stream ending early) is counted in
`problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

#: TCP connections of their own: without it grpc shares one between channels to the same target
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class ScriptedWorker:
    """One worker stream with `slots` slots that runs every Assign as a timed sleep."""

    def __init__(self, address: str, worker_id: str, slots: int = 1) -> None:
        self.address, self.worker_id, self.slots = address, worker_id, slots
        self.welcomed = asyncio.Event()
        #: what happened that should not: kind -> count
        self.problems: Counter[str] = Counter()
        self.assigned = self.completed = self.acked = 0
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"scripted-{self.worker_id}")

    @property
    def busy(self) -> int:
        return len(self._running)

    async def _requests(self):
        while (msg := await self._out.get()) is not None:
            yield msg

    async def _run(self) -> None:
        import grpc

        from spool.v1 import worker_service_pb2 as W
        from spool.v1 import worker_service_pb2_grpc as WG

        req = W.ConnectRequest
        hello = req.Hello(worker_id=self.worker_id, name=self.worker_id, slots=self.slots)
        hello.job_types.append("debug.sleep")
        self._out.put_nowait(req(hello=hello))
        heartbeat: asyncio.Task[None] | None = None
        async with grpc.aio.insecure_channel(self.address, options=OWN_CONNECTION) as channel:
            call = WG.WorkerServiceStub(channel).Connect(self._requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("message")
                    if kind == "welcome":
                        iv = msg.welcome.heartbeat_interval
                        every = iv.seconds + iv.nanos / 1e9 or 3.0
                        heartbeat = asyncio.create_task(self._heartbeat(every))
                        self._out.put_nowait(req(ready=req.Ready(credits=self.slots)))
                        self.welcomed.set()
                    elif kind == "assign":
                        self.assigned += 1
                        a = msg.assign
                        ref = (a.job.id, a.attempt)
                        self._running[ref] = asyncio.create_task(self._job(ref, a.job.params))
                    elif kind == "ack":
                        for entry in msg.ack.outcomes:
                            self.acked += 1
                            if not entry.applied:
                                self.problems[f"outcome refused: {entry.reason[:60]}"] += 1
                    else:
                        self.problems[f"unexpected {kind}"] += 1
                if not self._closing:
                    self.problems["stream ended by the control plane"] += 1
            except grpc.aio.AioRpcError as exc:
                if not self._closing:
                    self.problems[f"stream failed: {exc.code().name}"] += 1
            finally:
                if heartbeat is not None:
                    heartbeat.cancel()
                for task in self._running.values():
                    task.cancel()
                self._out.put_nowait(None)

    async def _heartbeat(self, every_s: float) -> None:
        from spool.v1 import worker_service_pb2 as W

        while True:
            await asyncio.sleep(every_s)
            refs = [W.AttemptRef(job_id=j, attempt=a) for j, a in self._running]
            self._out.put_nowait(
                W.ConnectRequest(heartbeat=W.ConnectRequest.Heartbeat(running=refs))
            )

    async def _job(self, ref: tuple[str, int], params: Any) -> None:
        """Sleep `duration` in `steps` steps with a progress report after each, then complete."""
        from spool.v1 import job_pb2
        from spool.v1 import worker_service_pb2 as W

        req = W.ConnectRequest
        fields = params.fields
        duration = fields["duration"].number_value if "duration" in fields else 1.0
        steps = max(1, int(fields["steps"].number_value)) if "steps" in fields else 1
        aref = W.AttemptRef(job_id=ref[0], attempt=ref[1])
        deadline = time.monotonic()
        for step in range(1, steps + 1):
            deadline += duration / steps
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            p = job_pb2.Progress(done=step, total=steps, fraction=step / steps, unit="steps")
            p.update_time.FromNanoseconds(time.time_ns())
            self._out.put_nowait(req(progress=req.ProgressUpdate(ref=aref, progress=p)))
        self._out.put_nowait(req(completed=req.Completed(ref=aref)))
        self._out.put_nowait(req(ready=req.Ready(credits=1)))
        self._running.pop(ref, None)
        self.completed += 1

    async def close(self, wait_s: float = 5.0) -> None:
        """Half-close the stream and let the control plane end it (the caller waits for
        the jobs to finish first); cut it after `wait_s`."""
        self._closing = True
        self._out.put_nowait(None)
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=wait_s)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
