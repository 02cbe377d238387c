"""`make run`: a control plane on embedded Postgres plus one local worker, until Ctrl-C.

Settings come from the environment like `spool-control` (auth off unless
SPOOL_AUTH=on). The worker (`python -m worker.main`) is pointed at the control
plane; it is skipped with a log line when the worker package is not importable.
Prometheus `/metrics` is on by default here: the control plane on
127.0.0.1:9464 (SPOOL_METRICS_PORT) and the worker on 127.0.0.1:9465
(SPOOL_WORKER_METRICS_PORT); set either to 0 to turn it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys

from control.config import Settings
from control.logs import configure_logging
from control.server import start_server
from spool import runloop

log = logging.getLogger("spool.devrun")

WORKER_STOP_GRACE_S = 15.0
#: /metrics ports of `make run` unless the environment names others
CONTROL_METRICS_PORT = 9464
WORKER_METRICS_PORT = 9465


def _worker_available() -> bool:
    try:
        return importlib.util.find_spec("worker.main") is not None
    except (ImportError, ValueError):
        return False


def _spawn_worker(address: str) -> subprocess.Popen[bytes] | None:
    if not _worker_available():
        log.info("worker.main not importable: running the control plane alone")
        return None
    env = {**os.environ, "SPOOL_SERVER": os.environ.get("SPOOL_SERVER", address)}
    env.setdefault("SPOOL_WORKER_METRICS_PORT", str(WORKER_METRICS_PORT))
    proc = subprocess.Popen([sys.executable, "-m", "worker.main"], env=env)
    log.info("started a worker (pid %d) against %s", proc.pid, address)
    port = int(env["SPOOL_WORKER_METRICS_PORT"] or 0)
    if port > 0:
        addr = env.get("SPOOL_WORKER_METRICS_ADDR") or "127.0.0.1"
        log.info("worker metrics: http://%s:%d/metrics", addr, port)
    return proc


async def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a worker process (it drains), kill it if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, WORKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("worker did not stop in %.0fs; killing it", WORKER_STOP_GRACE_S)
        proc.kill()
        await asyncio.to_thread(proc.wait)


async def run(settings: Settings) -> None:
    """Serve with a local worker until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cp = await start_server(settings)
    worker = _spawn_worker(cp.address)
    log.info("ready: grpcurl -plaintext %s list", cp.address)
    if settings.metrics_port > 0:
        log.info(
            "control metrics: http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port
        )
    try:
        await stop.wait()
    finally:
        if worker is not None:
            await stop_worker(worker)
        await cp.stop(settings.shutdown_grace_s)


def main() -> None:
    """Entry point of `python -m control.devrun`."""
    settings = Settings.from_env()
    if not os.environ.get("SPOOL_METRICS_PORT"):
        settings = settings.replace(metrics_port=CONTROL_METRICS_PORT)
    configure_logging(settings.log_format, settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        runloop.run(run(settings))


if __name__ == "__main__":
    main()
