"""The client side of a chaos run: submitter, cancels, watchers and terminal-state observers.

Every JobService call goes through `Api.call`, which records the status of each
try (`CallLog`): INTERNAL and UNKNOWN are violations; UNAVAILABLE and
DEADLINE_EXCEEDED are expected while a replica or Postgres is down and are
retried with backoff on the other replica. After UNAVAILABLE (nothing was done)
every call is retried; after DEADLINE_EXCEEDED, INTERNAL or UNKNOWN only the
idempotent ones (Get, List, Cancel, and Submit / SubmitBatch whose jobs carry a
request_id): a Submit without one is then given up, as a careful client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from bench.chaos.handlers import JOB_TYPE
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

#: tried again (on the next replica) with backoff
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: a client must never see these: the server failed without saying why
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "x-request-id"
#: an idempotent call retried this long without success is given up (a violation)
GIVE_UP_S = 60.0
TERMINAL = {
    job_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    job_pb2.JOB_STATE_FAILED: "failed",
    job_pb2.JOB_STATE_CANCELED: "canceled",
}
STATE_NAMES = {**TERMINAL, job_pb2.JOB_STATE_QUEUED: "queued", job_pb2.JOB_STATE_RUNNING: "running"}
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.http2.ping_timeout_ms", 3000),
]


class Clock:
    """Seconds since the run started (wall clock, comparable with database times)."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def now(self) -> float:
        return time.time() - self.t0


@dataclass
class CallLog:
    """Every try of every client call, by method and status."""

    clock: Clock
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    gave_up: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str = "",
        what: str = "",
        request_id: str = "",
    ) -> None:
        self.counts[(method, code.name)] += 1
        if code == grpc.StatusCode.OK or code in RETRYABLE:
            return
        entry = {
            "t": round(self.clock.now(), 2),
            "method": method,
            "code": code.name,
            "details": (details or "")[:300],
            "what": what,
            "request_id": request_id,
        }
        (self.bad if code in BAD else self.unexpected).append(entry)


class Api:
    """JobService over every replica; tries rotate replicas."""

    def __init__(self, addresses: list[str], key: str, calls: CallLog) -> None:
        self.channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [job_service_pb2_grpc.JobServiceStub(c) for c in self.channels]
        self.md = (("authorization", f"Bearer {key}"),)
        self.calls = calls
        self._next = 0
        self._tries = 0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Auth plus an x-request-id of our own, so a bad answer can be found in server logs."""
        self._tries += 1
        return (*self.md, (REQUEST_ID_HEADER, f"chaos-{self._tries}"))

    def pick(self) -> int:
        self._next = (self._next + 1) % len(self.stubs)
        return self._next

    async def call(
        self, method: str, request: Any, *, idempotent: bool = True, what: str = ""
    ) -> Any:
        """The response, or None if the call failed for good (recorded in the CallLog)."""
        start = time.monotonic()
        delay = 0.1
        r = self.pick()
        while True:
            try:
                md = self.metadata()
                resp = await getattr(self.stubs[r], method)(
                    request, metadata=md, timeout=CALL_TIMEOUT_S
                )
                self.calls.record(method, grpc.StatusCode.OK)
                return resp
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self.calls.record(method, code, exc.details() or "", what, md[-1][1])
                # UNAVAILABLE means the call was not carried out: any call may be tried
                # again. After anything else only an idempotent one may (a timeout or
                # an INTERNAL may hide a committed Submit).
                retry = code == grpc.StatusCode.UNAVAILABLE or (
                    idempotent and (code in RETRYABLE or code in BAD)
                )
                if not retry:
                    return None
                if time.monotonic() - start > GIVE_UP_S:
                    self.calls.gave_up.append(
                        {
                            "t": round(self.calls.clock.now(), 2),
                            "method": method,
                            "code": code.name,
                            "what": what,
                        }
                    )
                    return None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(1.0, delay * 2)
            r = (r + 1) % len(self.stubs)

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


# ------------------------------------------------------------------- workload


@dataclass
class PlannedJob:
    """One logical job of the workload (n is its label `chaos_n`)."""

    n: int
    params: dict[str, Any]
    max_attempts: int
    priority: int
    request_id: str = ""
    cancel_after_s: float | None = None
    watch: bool = False
    resubmit: bool = False
    #: ids the API returned for it (more than one only without request_id, never expected)
    ids: list[str] = field(default_factory=list)

    def spec(self) -> job_pb2.JobSpec:
        s = job_pb2.JobSpec(
            type=JOB_TYPE,
            priority=self.priority,
            max_attempts=self.max_attempts,
            labels={"chaos_n": str(self.n)},
            request_id=self.request_id,
        )
        s.params.update(self.params)
        return s


@dataclass
class Group:
    """Jobs sent in one call: a Submit (one job) or a SubmitBatch."""

    at_s: float
    jobs: list[PlannedJob]
    batch: bool


def plan_workload(
    rng: random.Random, n_jobs: int, window_s: float, watch_fraction: float
) -> list[Group]:
    """The seeded job mix, grouped into calls spread over `window_s` seconds."""
    run_tag = f"{rng.getrandbits(32):08x}"
    jobs: list[PlannedJob] = []
    for n in range(n_jobs):
        roll = rng.random()
        params: dict[str, Any] = {"n": n, "steps": rng.randint(2, 4)}
        max_attempts = 5
        cancel_after = None
        watch = rng.random() < watch_fraction
        if roll < 0.08:  # cancelled: long enough to be running when the cancel comes
            params.update(duration=round(rng.uniform(0.8, 1.6), 3), steps=8)
            cancel_after = round(rng.uniform(0.0, 1.5), 3)
            watch = watch or rng.random() < 0.5
        elif roll < 0.20:  # flaky: fails its first attempts, then succeeds
            params.update(
                duration=round(rng.uniform(0.02, 0.3), 3),
                fail_attempts=rng.randint(1, 2),
                retry_delay=0.1,
            )
        elif roll < 0.24:  # doomed: fails every attempt → FAILED CHAOS_FAIL
            params.update(duration=0.05, fail_attempts=100, retry_delay=0.1)
            max_attempts = 2
        elif roll < 0.32:  # slow, and watched: its watcher lives through faults
            params.update(duration=round(rng.uniform(1.5, 3.0), 3), steps=6)
            watch = True
        else:
            params.update(duration=round(rng.uniform(0.02, 0.4), 3))
        jobs.append(
            PlannedJob(
                n=n,
                params=params,
                max_attempts=max_attempts,
                priority=rng.randint(-5, 5),
                cancel_after_s=cancel_after,
                watch=watch,
            )
        )
    groups: list[Group] = []
    i = 0
    while i < len(jobs):
        if rng.random() < 0.5:
            size, batch = 1, False
        else:
            size, batch = rng.randint(5, 20), True
        chunk = jobs[i : i + size]
        i += size
        with_ids = rng.random() < 0.5
        for j in chunk:
            if with_ids:
                j.request_id = f"chaos-{run_tag}-{j.n}"
                j.resubmit = not batch and rng.random() < 0.2
        groups.append(Group(at_s=0.0, jobs=chunk, batch=batch))
    for k, g in enumerate(groups):
        g.at_s = round(window_s * k / max(1, len(groups)), 3)
    return groups


@dataclass
class DedupeCheck:
    """A deliberate second Submit of a request_id: must return the same job, deduplicated."""

    n: int
    first_id: str
    second_id: str
    deduplicated: bool


class Submitter:
    """Sends the planned groups on schedule; schedules cancels and watchers."""

    def __init__(self, api: Api, clock: Clock, groups: list[Group], watchers: Watchers) -> None:
        self.api = api
        self.clock = clock
        self.groups = groups
        self.watchers = watchers
        self.dedupe: list[DedupeCheck] = []
        self.unanswered = 0
        self.cancels = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def jobs(self) -> list[PlannedJob]:
        return [j for g in self.groups for j in g.jobs]

    async def run(self) -> None:
        for g in self.groups:
            wait = g.at_s - self.clock.now()
            if wait > 0:
                await asyncio.sleep(wait)
            self._spawn(self._send(g))
        while self._tasks:
            for result in await asyncio.gather(*list(self._tasks), return_exceptions=True):
                if isinstance(result, Exception):
                    raise result  # a bug of the harness: fail loudly

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, g: Group) -> None:
        idempotent = all(j.request_id for j in g.jobs)
        what = f"jobs n={g.jobs[0].n}..{g.jobs[-1].n}"
        if g.batch:
            req = job_service_pb2.SubmitBatchRequest(jobs=[j.spec() for j in g.jobs])
            resp = await self.api.call("SubmitBatch", req, idempotent=idempotent, what=what)
            got = list(resp.jobs) if resp is not None else []
        else:
            req = job_service_pb2.SubmitRequest(job=g.jobs[0].spec())
            resp = await self.api.call("Submit", req, idempotent=idempotent, what=what)
            got = [resp.job] if resp is not None else []
        if not got:
            self.unanswered += len(g.jobs)
            return
        for planned, job in zip(g.jobs, got, strict=True):
            planned.ids.append(job.id)
            if planned.watch:
                self.watchers.watch(job.id)
            if planned.cancel_after_s is not None:
                self._spawn(self._cancel_later(job.id, planned.cancel_after_s))
            if planned.resubmit:
                self._spawn(self._resubmit(planned, job.id))

    async def _cancel_later(self, job_id: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        self.cancels += 1
        req = job_service_pb2.CancelRequest(job_id=job_id, reason="chaos")
        await self.api.call("Cancel", req, what=f"job {job_id}")

    async def _resubmit(self, planned: PlannedJob, first_id: str) -> None:
        req = job_service_pb2.SubmitRequest(job=planned.spec())
        resp = await self.api.call("Submit", req, what=f"resubmit n={planned.n}")
        if resp is not None:
            self.dedupe.append(DedupeCheck(planned.n, first_id, resp.job.id, resp.deduplicated))


# --------------------------------------------------------------------- watchers


@dataclass
class Watch:
    """What one WatchProgress watcher of one job saw, across its reconnects."""

    job_id: str
    #: (seq, kind, state, t) in arrival order
    events: list[tuple[int, int, int, float]] = field(default_factory=list)
    terminal_at: float | None = None
    ended_at: float | None = None
    after_terminal: list[int] = field(default_factory=list)
    resumes: int = 0
    cuts: int = 0
    early_eofs: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    gave_up: bool = False

    @property
    def last_seq(self) -> int:
        return self.events[-1][0] if self.events else 0


class Watchers:
    """Live WatchProgress streams on a sample of jobs, resuming with after_seq on errors."""

    def __init__(self, api: Api, clock: Clock) -> None:
        self.api = api
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self._calls: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        #: exceptions that ended a watcher (bugs of the harness: reported as violations)
        self.errors: list[str] = []

    def watch(self, job_id: str) -> None:
        if job_id in self.watches:
            return
        w = Watch(job_id)
        self.watches[job_id] = w
        task = asyncio.create_task(self._run(w))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def open_count(self) -> int:
        return len(self._calls)

    def cut(self, rng: random.Random, n: int) -> int:
        """Cancel the current call of up to n open watchers (they resume); how many were cut."""
        open_ids = sorted(self._calls)
        chosen = rng.sample(open_ids, min(n, len(open_ids)))
        for job_id in chosen:
            self.watches[job_id].cuts += 1
            self._calls[job_id].cancel()
        return len(chosen)

    async def _run(self, w: Watch) -> None:
        start = time.monotonic()
        delay = 0.1
        first = True
        while w.ended_at is None and not self._stopping:
            stub = self.api.stubs[self.api.pick()]
            req = job_service_pb2.WatchProgressRequest(job_id=w.job_id, after_seq=w.last_seq)
            w.resumes += 0 if first else 1
            first = False
            md = self.api.metadata()
            call = stub.WatchProgress(req, metadata=md)
            self._calls[w.job_id] = call
            cut_before = w.cuts
            try:
                async for resp in call:
                    self._on_event(w, resp.event)
                self.api.calls.record("WatchProgress", grpc.StatusCode.OK)
                if w.terminal_at is not None:
                    w.ended_at = self.clock.now()
                    break
                w.early_eofs += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if self._stopping:
                    return
                if not (code == grpc.StatusCode.CANCELLED and w.cuts > cut_before):
                    w.errors[code.name] += 1
                    self.api.calls.record(
                        "WatchProgress", code, exc.details() or "", f"job {w.job_id}", md[-1][1]
                    )
            except asyncio.CancelledError:
                if w.cuts == cut_before:
                    raise
            finally:
                self._calls.pop(w.job_id, None)
            if time.monotonic() - start > 10 * GIVE_UP_S:
                w.gave_up = True
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(1.0, delay * 2)

    def _on_event(self, w: Watch, e: job_pb2.JobEvent) -> None:
        t = self.clock.now()
        if w.terminal_at is not None:
            w.after_terminal.append(e.seq)
        w.events.append((e.seq, e.kind, e.state, t))
        terminal = e.kind == job_pb2.JOB_EVENT_KIND_STATE and e.state in TERMINAL
        if terminal and w.terminal_at is None:
            w.terminal_at = t

    async def finish(self, wait_s: float) -> None:
        """Give open watchers `wait_s` to end by themselves, then stop them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait_s)
        self._stopping = True
        for call in list(self._calls.values()):
            call.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(f"watcher: {task.exception()!r}")


# -------------------------------------------------------------------- observer


def terminal_snapshot(job: job_pb2.Job) -> dict[str, Any]:
    """What must never change once a job is terminal."""
    result = json_format.MessageToDict(job.result) if job.HasField("result") else None
    return {
        "state": STATE_NAMES.get(job.state, str(job.state)),
        "attempt": job.attempt,
        "result": json.dumps(result, sort_keys=True),
        "error": job.error.code,
        "finish_time": job.finish_time.ToNanoseconds(),
        "worker_id": job.worker_id,
    }


@dataclass
class TerminalChange:
    job_id: str
    first: dict[str, Any]
    later: dict[str, Any]
    t: float
    via: str


class Observer:
    """Records what List and Get say about terminal jobs, over and over, and any change."""

    def __init__(self, api: Api, clock: Clock, rng: random.Random, interval_s: float) -> None:
        self.api = api
        self.clock = clock
        self.rng = rng
        self.interval_s = interval_s
        self.first: dict[str, dict[str, Any]] = {}
        self.changes: list[TerminalChange] = []
        self.rounds = 0
        self.observations = 0

    def see(self, job: job_pb2.Job, via: str) -> None:
        if job.state not in TERMINAL:
            return
        self.observations += 1
        snap = terminal_snapshot(job)
        first = self.first.setdefault(job.id, snap)
        if snap != first:
            self.changes.append(TerminalChange(job.id, first, snap, self.clock.now(), via))

    async def round(self) -> None:
        token = ""
        states = list(TERMINAL)
        while True:
            req = job_service_pb2.ListRequest(states=states, page_size=500, page_token=token)
            resp = await self.api.call("List", req, what="terminal jobs")
            if resp is None:
                break
            for job in resp.jobs:
                self.see(job, "List")
            token = resp.next_page_token
            if not token:
                break
        for job_id in self.rng.sample(sorted(self.first), min(5, len(self.first))):
            resp = await self.api.call(
                "Get", job_service_pb2.GetRequest(job_id=job_id), what=f"job {job_id}"
            )
            if resp is not None:
                self.see(resp.job, "Get")
        self.rounds += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.round()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


def new_tenant(seed: int) -> str:
    """A tenant of its own per run (checks read only its jobs, also on a shared database)."""
    return f"chaos-{seed}-{uuid.uuid4().hex[:6]}"
