"""The systems bench.throughput drives: Spool, pgqueuer, Celery + Redis.

Each system is started once per repetition (a fresh database on the shared
Postgres for Spool and pgqueuer, a flushed Redis for Celery) and offers the
same verbs: submit N no-op jobs batched or one at a time (from 1 or C callers),
wait until every submitted job is done, measure round trips, and name the
processes whose CPU counts (`cpu_roots`).

How "done" is observed, per system (polled every POLL_S, after the last submit):
- Spool: `GetStats().totals.succeeded` reaches the count before + N.
- pgqueuer: `Queries.queue_size()` is empty (pgqueuer moves a finished job
  from its queue table to its log table).
- Celery: every task's result key is present in the Redis result backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: how often a system is asked whether all jobs are done
POLL_S = 0.025
#: round-trip samples discarded before measuring (connections, slot processes warm)
RT_WARMUP = 10
_TICK = os.sysconf("SC_CLK_TCK")


class Skip(Exception):
    """A peer that cannot run here (missing package or binary); the reason is shown."""


# ----------------------------------------------------------------- CPU accounting


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own utime+stime ticks, reaped children's cutime+cstime ticks)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2 :].split()
        table[int(entry.name)] = (
            int(rest[1]),
            int(rest[11]) + int(rest[12]),
            int(rest[13]) + int(rest[14]),
        )
    return table


def cpu_seconds(roots: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """CPU seconds so far of each named process tree: {name: (root pid, with descendants)}.

    A tree counts its live processes' utime+stime plus what its reaped children
    used (cutime+cstime), so Postgres backends that exit still count.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, (root, tree) in roots.items():
        if root not in table:
            out[name] = 0.0
            continue
        ticks = table[root][1]
        if tree:
            stack = [root]
            ticks = 0
            while stack:
                pid = stack.pop()
                _, own, reaped = table[pid]
                ticks += own + reaped
                stack.extend(children.get(pid, ()))
        out[name] = ticks / _TICK
    return out


# ------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process with its output in `log`, from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )


async def stop(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)


async def poll_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, procs=()
) -> None:
    """Await `check()` every POLL_S until true; fail after `timeout_s` or if a process died."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args[:3]} exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


async def _callers(n: int, concurrency: int, one: Callable[[], Awaitable[Any]]) -> None:
    """`n` calls of `one()` from `concurrency` callers, each making its share in sequence."""

    async def caller(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(caller(c) for c in _split(n, concurrency) if c))


def done_timeout_s(n: int) -> float:
    """How long a system may take to finish `n` no-op jobs before the run fails."""
    return 120.0 + n / 20.0


# ------------------------------------------------------------------------ Spool


class SpoolSystem:
    """`python -m control.main` on its own database, `python -m worker.main` times P."""

    name = "Spool"
    observed = (
        "done: `GetStats` succeeded count; round trip: a `WatchProgress` stream opened"
        " after `Submit` returned, until the SUCCEEDED event"
    )

    def __init__(self, pg: Any, tmp: Path, workers: str, worker_args: list[str]) -> None:
        procs, _, slots = workers.partition("x")
        self.procs, self.slots = int(procs), int(slots or 1)
        self.worker_args = worker_args
        self.pg, self.tmp = pg, tmp
        self.cp: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.config = (
            f"`python -m control.main` (defaults, auth off) + {self.procs} x "
            f"`python -m worker.main --slots {self.slots} --types debug.noop`"
            + (f" {' '.join(worker_args)}" if worker_args else "")
            + '; job type `debug.noop` (`isolation = "async"`: an `async def run`'
            " on the worker's event loop)"
        )

    async def start(self, rep: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from spool.v1 import job_service_pb2_grpc

        url = self.pg.create_database(f"spool_bench_r{rep}")
        self.address = f"127.0.0.1:{free_port()}"
        log = self.tmp / f"spool-control-r{rep}.log"
        env = {
            "SPOOL_DATABASE_URL": url,
            "SPOOL_LISTEN": self.address,
            "SPOOL_DATA_DIR": str(self.tmp / f"spool-data-r{rep}"),
            "SPOOL_AUTH": "off",
            "SPOOL_LOG_LEVEL": "WARNING",
        }
        self.cp = spawn([sys.executable, "-m", "control.main"], log, env)
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)

        async def serving() -> bool:
            try:
                got = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return got.status == health_pb2.HealthCheckResponse.SERVING

        await poll_until(serving, 90, f"Spool control plane (log {log})", [self.cp])
        for i in range(self.procs):
            wenv = {
                "SPOOL_SERVER": self.address,
                "SPOOL_WORKER_ID": f"bench-r{rep}-{i}",
                "SPOOL_WORKER_STATE_DIR": str(self.tmp / f"spool-state-r{rep}-{i}"),
                "SPOOL_WORKER_WORKDIR": str(self.tmp / f"spool-work-r{rep}-{i}"),
                "SPOOL_DEVICE": "cpu",
                "SPOOL_LOG_LEVEL": "WARNING",
            }
            command = [sys.executable, "-m", "worker.main", "--slots", str(self.slots)]
            command += ["--types", "debug.noop", *self.worker_args]
            self.workers.append(spawn(command, self.tmp / f"spool-worker-r{rep}-{i}.log", wenv))

        async def connected() -> bool:
            return (await self._stats()).connected_workers >= self.procs

        await poll_until(connected, 90, "Spool workers", [self.cp, *self.workers])
        # Warm up: every slot has run a job.
        await self.begin()
        await self.submit_batched(self.procs * self.slots * 2, 500)
        await self.wait_done()

    async def _stats(self) -> Any:
        from spool.v1 import job_service_pb2 as pb

        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=30)

    def cpu_roots(self) -> dict[str, tuple[int, bool]]:
        roots = {"control": (self.cp.pid, True)}
        for i, w in enumerate(self.workers):
            roots[f"worker{i}" if len(self.workers) > 1 else "worker"] = (w.pid, True)
        return roots

    async def begin(self) -> None:
        totals = (await self._stats()).totals
        self._target, self._failed = totals.succeeded, totals.failed

    def _spec(self) -> Any:
        from spool.v1 import job_pb2

        return job_pb2.JobSpec(type="debug.noop")

    async def submit_batched(self, n: int, batch: int) -> None:
        from spool.v1 import job_service_pb2 as pb

        for size in [batch] * (n // batch) + ([n % batch] if n % batch else []):
            await self.stub.SubmitBatch(
                pb.SubmitBatchRequest(jobs=[self._spec() for _ in range(size)]), timeout=120
            )
            self._target += size

    async def submit_single(self, n: int, concurrency: int) -> None:
        from spool.v1 import job_service_pb2 as pb

        async def one() -> None:
            await self.stub.Submit(pb.SubmitRequest(job=self._spec()), timeout=60)

        await _callers(n, concurrency, one)
        self._target += n

    async def wait_done(self) -> None:
        target, failed0 = self._target, self._failed

        async def done() -> bool:
            stats = await self._stats()
            if stats.totals.failed > failed0:
                raise RuntimeError(f"Spool: {stats.totals.failed - failed0} no-op jobs failed")
            return stats.totals.succeeded >= target

        await poll_until(done, done_timeout_s(target), "Spool jobs", [self.cp, *self.workers])

    async def round_trip(self, samples: int) -> list[float]:
        """Submit → SUCCEEDED seen on a WatchProgress stream opened after Submit returned."""
        from spool.v1 import job_pb2
        from spool.v1 import job_service_pb2 as pb

        out = []
        for i in range(samples + RT_WARMUP):
            t0 = time.perf_counter()
            job = (await self.stub.Submit(pb.SubmitRequest(job=self._spec()), timeout=60)).job
            call = self.stub.WatchProgress(pb.WatchProgressRequest(job_id=job.id), timeout=60)
            state = None
            async for resp in call:
                state = resp.event.state
                if state == job_pb2.JOB_STATE_SUCCEEDED:
                    break
            t1 = time.perf_counter()
            call.cancel()
            if state != job_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"Spool: job {job.id} ended in state {state}")
            if i >= RT_WARMUP:
                out.append((t1 - t0) * 1000)
        return out

    async def stop(self) -> None:
        await asyncio.gather(*(stop(w) for w in self.workers))
        self.workers = []
        with contextlib.suppress(Exception):
            await self.channel.close()
        await stop(self.cp)


# --------------------------------------------------------------------- pgqueuer


class PgqueuerSystem:
    """One `python -m bench.peers pgqueuer-worker` process (asyncio, one connection)."""

    name = "pgqueuer"
    observed = (
        "done: `Queries.queue_size()` empty; round trip: `CompletionWatcher.wait_for`"
        " (LISTEN/NOTIFY, debounce 0)"
    )

    def __init__(self, pg: Any, tmp: Path, batch_size: int, rt_batch_size: int, pool: int):
        try:
            from importlib.metadata import version

            self.version = version("pgqueuer")
        except Exception as exc:
            raise Skip("pgqueuer is not installed (pip install -e '.[bench]')") from exc
        self.pg, self.tmp = pg, tmp
        self.batch_size, self.rt_batch_size, self.pool_size = batch_size, rt_batch_size, pool
        self.worker: subprocess.Popen | None = None
        self.config = (
            f"pgqueuer {self.version}: one `QueueManager` process, async no-op entrypoint, "
            f"`batch_size={batch_size}` (round trip: a worker with `batch_size={rt_batch_size}`);"
            f" clients: one asyncpg connection, {pool}-connection pool for concurrent callers"
        )

    async def start(self, rep: int) -> None:
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        from control.db import libpq_url

        self.rep = rep
        self.dsn = libpq_url(self.pg.create_database(f"pgq_bench_r{rep}"))
        self.conn = await asyncpg.connect(self.dsn)
        self.queries = Queries(AsyncpgDriver(self.conn))
        await self.queries.install()
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        from pgqueuer.db import AsyncpgPoolDriver

        self.pool_queries = Queries(AsyncpgPoolDriver(self.pool))
        await self._start_worker(self.batch_size)

    async def _start_worker(self, batch_size: int) -> None:
        await stop(self.worker)
        command = [sys.executable, "-m", "bench.peers", "pgqueuer-worker", "--dsn", self.dsn]
        command += ["--batch-size", str(batch_size)]
        self.worker = spawn(command, self.tmp / f"pgqueuer-worker-r{self.rep}.log")
        await self.submit_batched(20, 20)
        await self.wait_done()

    def cpu_roots(self) -> dict[str, tuple[int, bool]]:
        return {"worker": (self.worker.pid, True)}

    async def begin(self) -> None:
        return None

    async def submit_batched(self, n: int, batch: int) -> None:
        from bench.peers import PGQ_ENTRYPOINT

        for size in [batch] * (n // batch) + ([n % batch] if n % batch else []):
            await self.queries.enqueue([PGQ_ENTRYPOINT] * size, [None] * size, [0] * size)

    async def submit_single(self, n: int, concurrency: int) -> None:
        from bench.peers import PGQ_ENTRYPOINT

        queries = self.queries if concurrency == 1 else self.pool_queries

        async def one() -> None:
            await queries.enqueue(PGQ_ENTRYPOINT, None)

        await _callers(n, concurrency, one)

    async def wait_done(self) -> None:
        async def done() -> bool:
            return sum(s.count for s in await self.queries.queue_size()) == 0

        await poll_until(done, done_timeout_s(10_000), "pgqueuer jobs", [self.worker])

    async def round_trip(self, samples: int) -> list[float]:
        """enqueue → `CompletionWatcher.wait_for` resolves (LISTEN/NOTIFY, no debounce)."""
        from datetime import timedelta

        import asyncpg
        from pgqueuer.core.completion import CompletionWatcher
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        from bench.peers import PGQ_ENTRYPOINT

        await self._start_worker(self.rt_batch_size)
        listen = await asyncpg.connect(self.dsn)
        out = []
        try:
            driver = AsyncpgDriver(listen)
            async with CompletionWatcher(
                driver, queries=Queries(driver), debounce=timedelta(0)
            ) as watcher:
                for i in range(samples + RT_WARMUP):
                    t0 = time.perf_counter()
                    (jid,) = await self.queries.enqueue(PGQ_ENTRYPOINT, None)
                    status = await asyncio.wait_for(watcher.wait_for(jid), 60)
                    t1 = time.perf_counter()
                    if status != "successful":
                        raise RuntimeError(f"pgqueuer: job {jid} ended {status}")
                    if i >= RT_WARMUP:
                        out.append((t1 - t0) * 1000)
        finally:
            await listen.close()
            await self._start_worker(self.batch_size)
        return out

    async def stop(self) -> None:
        await stop(self.worker)
        self.worker = None
        await self.pool.close()
        await self.conn.close()


# ----------------------------------------------------------------------- Celery


def find_redis_server() -> str | None:
    """The redis-server binary (Debian's package puts it in /usr/bin)."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


class CelerySystem:
    """`celery worker --pool prefork -c C` on a loopback redis-server (broker + results)."""

    name = "Celery"
    observed = "done: every task's result key in Redis; round trip: `AsyncResult.get()`"

    def __init__(self, tmp: Path, concurrency: int, threads: int) -> None:
        try:
            from importlib.metadata import version

            self.version = version("celery")
            import redis  # noqa: F401
        except Exception as exc:
            raise Skip("celery/redis are not installed (pip install -e '.[bench]')") from exc
        self.redis_bin = find_redis_server()
        if self.redis_bin is None:
            raise Skip("redis-server not found (Debian: apt-get install -y redis-server)")
        self.tmp, self.concurrency = tmp, concurrency
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="celery-client")
        self.redis: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.config = (
            f"Celery {self.version} + Redis (`redis-server` on loopback, no persistence):"
            f" one `celery worker --pool prefork --concurrency {concurrency}"
            " --without-gossip --without-mingle --without-heartbeat`, defaults otherwise"
            " (prefetch multiplier 4, early ack); results in Redis; batched submit ="
            " `group(...).apply_async()`; sync client calls run on a thread pool"
        )

    async def start(self, rep: int) -> None:
        import redis.asyncio as aioredis

        if self.redis is None:
            port = free_port()
            self.url = f"redis://127.0.0.1:{port}"
            cmd = [self.redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            cmd += ["--appendonly", "no", "--dir", str(self.tmp)]
            self.redis = spawn(cmd, self.tmp / "redis.log")
            os.environ["BENCH_REDIS_URL"] = self.url
            self.results = aioredis.Redis.from_url(f"{self.url}/1")

            async def up() -> bool:
                try:
                    return bool(await self.results.ping())
                except Exception:
                    return False

            await poll_until(up, 30, "redis-server", [self.redis])
        await self.results.flushall()
        from bench import peers

        self.app, self.task = peers.celery_app, peers.noop
        command = [sys.executable, "-m", "celery", "-A", "bench.peers:celery_app", "worker"]
        command += ["--pool", "prefork", "--concurrency", str(self.concurrency), "-n"]
        command += [f"bench-r{rep}@%h", "--without-gossip", "--without-mingle"]
        command += ["--without-heartbeat", "--loglevel", "WARNING"]
        env = {"BENCH_REDIS_URL": self.url}
        self.worker = spawn(command, self.tmp / f"celery-worker-r{rep}.log", env)
        self._ids: list[str] = []
        await self.submit_batched(self.concurrency * 2, 500)
        await self.wait_done()

    def cpu_roots(self) -> dict[str, tuple[int, bool]]:
        return {"worker": (self.worker.pid, True), "redis": (self.redis.pid, False)}

    async def begin(self) -> None:
        self._ids = []

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def submit_batched(self, n: int, batch: int) -> None:
        from celery import group

        def send(size: int) -> list[str]:
            result = group(self.task.s() for _ in range(size)).apply_async()
            return [r.id for r in result.results]

        for size in [batch] * (n // batch) + ([n % batch] if n % batch else []):
            self._ids += await self._in_thread(lambda size=size: send(size))

    async def submit_single(self, n: int, concurrency: int) -> None:
        def caller(count: int) -> list[str]:
            return [self.task.delay().id for _ in range(count)]

        shares = [c for c in _split(n, concurrency) if c]
        for ids in await asyncio.gather(*(self._in_thread(lambda c=c: caller(c)) for c in shares)):
            self._ids += ids

    async def wait_done(self) -> None:
        keys = [f"celery-task-meta-{i}" for i in self._ids]
        pos = 0

        async def done() -> bool:
            nonlocal pos
            while pos < len(keys):
                chunk = keys[pos : pos + 1000]
                got = await self.results.mget(chunk)
                ready = next((k for k, v in enumerate(got) if v is None), len(chunk))
                pos += ready
                if ready < len(chunk):
                    return False
            return True

        await poll_until(done, done_timeout_s(len(keys)), "Celery tasks", [self.worker])
        self._ids = []

    async def round_trip(self, samples: int) -> list[float]:
        """`noop.delay()` → `AsyncResult.get()` returns (Redis pub/sub)."""

        def run() -> list[float]:
            out = []
            for i in range(samples + RT_WARMUP):
                t0 = time.perf_counter()
                self.task.delay().get(timeout=60)
                if i >= RT_WARMUP:
                    out.append((time.perf_counter() - t0) * 1000)
            return out

        return await self._in_thread(run)

    async def stop(self) -> None:
        await stop(self.worker)
        self.worker = None

    async def close(self) -> None:
        """Stop redis-server (after the last repetition)."""
        await stop(self.worker)
        with contextlib.suppress(Exception):
            await self.results.aclose()
        await stop(self.redis)
        self.redis = None
        self.pool.shutdown(wait=False)
