"""The processes of a chaos run: Postgres, control replicas, workers, and stream proxies.

Everything is real and local: an embedded Postgres (pgserver) in the run's temp
dir that can be stopped and started on the same data dir with its `pg_ctl`, or
an external URL (then it is never restarted); control replicas as
`python -m control.main` subprocesses on free loopback ports; workers as
`python -m worker.main` subprocesses. Each subprocess leads its own process
group (so SIGKILL / SIGSTOP reach its slot processes too, as a machine crash or
freeze would) and runs under `nice`. Each worker dials a small TCP proxy owned
by this process, which forwards to a live replica (its preferred one first) and
can cut the worker's connections on demand: a stream cut without a process fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.chaos.handlers import INSTANCE_ENV, JOB_TYPE, MARKS_ENV
from control.db import libpq_url

log = logging.getLogger("spool.chaos")

REPO = Path(__file__).resolve().parents[2]
#: niceness of every subprocess (the machine is shared)
NICE = 10
TENANT = "chaos"
CLIENT_KEY = "chaos-client-key"
WORKER_KEY = "chaos-worker-key"
#: short periods so every fault resolves within seconds
LEASE_S = 3.0
HEARTBEAT_S = 0.5
CANCEL_GRACE_S = 1.5
#: how long a process gets to stop on SIGTERM before SIGKILL
STOP_WAIT_S = 10.0
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`nice python -m module` leading its own process group, output appended to log_path."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            ["nice", "-n", str(NICE), sys.executable, "-m", module],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


async def _stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (after SIGCONT), SIGKILL of the whole group if it is slow; always reaped."""
    if proc is None:
        return
    if proc.poll() is None:
        _signal_group(proc, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
    # Slot processes left behind by a killed parent.
    _signal_group(proc, signal.SIGKILL)


# --------------------------------------------------------------------- Postgres


# Started in a child process: pgserver starts the server with subprocess(user=...)
# when root, i.e. a plain fork(), which is unsafe (it crashed) in a process where
# gRPC threads run. The child exits with os._exit so pgserver's atexit handler
# leaves the server running; this process stops it with pg_ctl at the end.
_START_EMBEDDED = """
import os, sys
from control.embedded import EmbeddedPostgres
pg = EmbeddedPostgres(sys.argv[1])
pg.start()
print(pg.url(), flush=True)
os._exit(0)
"""


class Postgres:
    """The run's database: embedded and restartable, or external (`url`) and never restarted.

    The embedded one is pgserver's (control.embedded.EmbeddedPostgres) in the run dir;
    restarts and the final stop use its `pg_ctl` on the same data dir and socket.
    """

    def __init__(self, root: Path, external_url: str = "") -> None:
        self.root = root
        self.external_url = external_url
        self.restartable = not external_url
        self.url = external_url
        self._pgdata = root / "pg"
        self._socket_dir: str = ""
        self._started = False
        self.running = False

    def start(self) -> None:
        """Start the embedded server (blocking), or do nothing for an external one."""
        if not self.restartable:
            self.running = True
            return
        self._started = True
        out = subprocess.run(
            [sys.executable, "-c", _START_EMBEDDED, str(self._pgdata)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.url = out.stdout.strip().splitlines()[-1]
        info = self._postmaster()
        if not info or len(info) < 5 or not info[4]:
            raise RuntimeError(f"embedded postgres in {self._pgdata} has no socket dir")
        self._socket_dir = info[4]
        self.running = True

    def _postmaster(self) -> list[str] | None:
        """The lines of postmaster.pid (pid, pgdata, start, port, socket dir, …), if any."""
        try:
            return (self._pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None

    def _pg_ctl(self, *args: str) -> None:
        cmd = [str(Path(_pgserver_bin()) / "pg_ctl"), "-D", str(self._pgdata), *args]
        if os.geteuid() == 0:
            # pgserver runs the server as user "pgserver" when we are root. runuser
            # rather than subprocess(user=…), which forks (see _START_EMBEDDED).
            cmd = ["runuser", "-u", "pgserver", "--", *cmd]
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
        )

    def stop_server(self) -> None:
        """`pg_ctl stop -m fast`: every connection is terminated (admin shutdown)."""
        self._pg_ctl("-w", "-m", "fast", "stop")
        self.running = False

    def start_server(self) -> None:
        """Start the same data dir again on the same socket (same URL)."""
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir}",
            "-l",
            str(self._pgdata / "log"),
            "start",
        )
        self.running = True

    def close(self) -> None:
        """Stop the embedded server and delete its data dir."""
        if not self._started:
            return
        if self._postmaster():
            with contextlib.suppress(Exception):
                self._pg_ctl("-w", "-m", "fast", "stop")
        shutil.rmtree(self._pgdata, ignore_errors=True)
        self._started = False
        self.running = False


def _pgserver_bin() -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH)


# ------------------------------------------------------------- control replicas


@dataclass
class Replica:
    """One `spool-control` subprocess on a fixed port (kept across restarts)."""

    index: int
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.proc = _spawn("control.main", self.env, self.log_path)

    async def wait_serving(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the health service says SERVING (raises RuntimeError on timeout or exit)."""
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.index} exited ({self.proc.returncode})")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"replica {self.index} not SERVING within {timeout_s}s")

    def kill(self) -> None:
        _signal_group(self.proc, signal.SIGKILL)

    async def reap(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)

    async def stop(self) -> None:
        await _stop_process(self.proc)


# ---------------------------------------------------------------------- workers


@dataclass
class Worker:
    """One `spool-worker` subprocess; a restart keeps its id and starts a new instance."""

    index: int
    worker_id: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def instance(self) -> str:
        """`<worker id>#<start number>`: which process ran an attempt (see handlers.py)."""
        return f"{self.worker_id}#{self.starts}"

    def start(self) -> None:
        self.starts += 1
        self.proc = _spawn("worker.main", {**self.env, INSTANCE_ENV: self.instance}, self.log_path)

    def signal(self, sig: int) -> None:
        _signal_group(self.proc, sig)

    async def reap(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)

    async def stop(self) -> None:
        await _stop_process(self.proc)


# ---------------------------------------------------------------- stream proxy


class StreamProxy:
    """A loopback TCP proxy in front of the replicas for one worker.

    Each accepted connection goes to the first replica (preferred one first) that
    accepts it; `cut()` aborts every open connection (both sides), which the
    worker sees as its stream failing.
    """

    def __init__(self, replicas: list[Replica], prefer: int) -> None:
        self._replicas = replicas
        self._prefer = prefer
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(self._replicas)
        order = [self._replicas[(self._prefer + i) % n] for i in range(n)]
        for replica in order:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", replica.port)
            except OSError:
                continue
            pair = (writer, up_writer)
            self._pairs.add(pair)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                self._pairs.discard(pair)
                for w in pair:
                    w.transport.abort()
            return
        writer.transport.abort()

    def cut(self) -> int:
        """Abort every open connection; returns how many there were."""
        pairs = list(self._pairs)
        for pair in pairs:
            for w in pair:
                w.transport.abort()
        return len(pairs)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.transport.abort()


# ---------------------------------------------------------------------- cluster


@dataclass
class ClusterSpec:
    """What to start."""

    replicas: int = 2
    workers: int = 4
    slots: int = 2
    database_url: str = ""


@dataclass
class Cluster:
    """Postgres + replicas + workers (+ one proxy per worker) in `run_dir`."""

    spec: ClusterSpec
    run_dir: Path
    postgres: Postgres = field(init=False)
    replicas: list[Replica] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    proxies: list[StreamProxy] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.postgres = Postgres(self.run_dir, self.spec.database_url)
        self.marks_dir = self.run_dir / "marks"
        self.logs_dir = self.run_dir / "logs"

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def tenant_keys(self, tenant: str) -> str:
        return f"{CLIENT_KEY}:{tenant}:client,{WORKER_KEY}:{tenant}:worker"

    async def start(self, tenant: str) -> None:
        """Start everything and wait until every replica serves and every worker is connected."""
        self.marks_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.postgres.start)
        from control.migrations import upgrade_sync

        await asyncio.to_thread(upgrade_sync, self.postgres.url)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
        base["PYTHONPATH"] = str(REPO)
        for i in range(self.spec.replicas):
            port = free_port()
            env = {
                **base,
                "SPOOL_LISTEN": f"127.0.0.1:{port}",
                "SPOOL_DATABASE_URL": self.postgres.url,
                "SPOOL_DATA_DIR": str(self.run_dir / f"replica{i}"),
                "SPOOL_AUTH": "on",
                "SPOOL_API_KEYS": self.tenant_keys(tenant),
                "SPOOL_REFLECTION": "off",
                "SPOOL_LEASE_S": str(LEASE_S),
                "SPOOL_HEARTBEAT_S": str(HEARTBEAT_S),
                "SPOOL_CANCEL_GRACE_S": str(CANCEL_GRACE_S),
                "SPOOL_RETRY_BACKOFF_BASE": "0.2",
                "SPOOL_RETRY_BACKOFF_MAX": "1",
                "SPOOL_SHUTDOWN_GRACE": "1",
                "SPOOL_DB_POOL_SIZE": "5",
                "SPOOL_DB_MAX_OVERFLOW": "10",
                "SPOOL_KEEPALIVE": "5s",
                "SPOOL_KEEPALIVE_TIMEOUT": "3s",
                "SPOOL_LOG_FORMAT": "text",
                "SPOOL_LOG_LEVEL": "INFO",
            }
            self.replicas.append(Replica(i, port, env, self.logs_dir / f"replica{i}.log"))
        for r in self.replicas:
            r.start()
        await asyncio.gather(*(r.wait_serving() for r in self.replicas))
        for i in range(self.spec.workers):
            proxy = StreamProxy(self.replicas, prefer=i % len(self.replicas))
            await proxy.start()
            self.proxies.append(proxy)
            wid = f"chaos-w{i}"
            env = {
                **base,
                "SPOOL_SERVER": proxy.address,
                "SPOOL_TOKEN": WORKER_KEY,
                "SPOOL_WORKER_ID": wid,
                "SPOOL_WORKER_NAME": wid,
                "SPOOL_WORKER_SLOTS": str(self.spec.slots),
                "SPOOL_WORKER_TYPES": JOB_TYPE,
                "SPOOL_WORKER_HANDLERS": "bench.chaos.handlers:Step",
                "SPOOL_WORKER_STATE_DIR": str(self.run_dir / f"{wid}.state"),
                "SPOOL_WORKER_WORKDIR": str(self.run_dir / f"{wid}.work"),
                "SPOOL_WORKER_KEEPALIVE_MS": "2000",
                "SPOOL_DRAIN_GRACE_S": "1",
                "SPOOL_DEVICE": "cpu",
                "SPOOL_LOG_LEVEL": "INFO",
                MARKS_ENV: str(self.marks_dir),
            }
            self.workers.append(Worker(i, wid, env, self.logs_dir / f"{wid}.log"))
        for w in self.workers:
            w.start()
        await self.wait_workers_connected([w.worker_id for w in self.workers])

    async def wait_workers_connected(
        self, ids: list[str], timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.worker_id} exited ({w.proc.returncode})")
            rows = await self.query(
                "SELECT id FROM workers WHERE connected AND id = ANY($1::text[])", ids
            )
            if len(rows) == len(ids):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"workers {ids} not all connected within {timeout_s}s")

    async def query(self, sql: str, *args: Any) -> list[Any]:
        """One read on the run's database (a fresh connection: Postgres may have restarted)."""
        conn = await asyncpg.connect(libpq_url(self.postgres.url), timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def close(self) -> None:
        """Stop every process this cluster started, then Postgres (never raises)."""
        for w in self.workers:
            w.signal(signal.SIGCONT)
        results = await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        for p in self.proxies:
            with contextlib.suppress(Exception):
                await p.close()
        results += await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        for res in results:
            if isinstance(res, Exception):
                log.warning("stopping a process failed: %s", res)
        await asyncio.to_thread(self.postgres.close)
