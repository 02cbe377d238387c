"""Helpers of the client tests: a `spool-worker` subprocess and its connection wait.

The worker is a real `python -m worker.main` process serving `debug.*` and
`client.reverse` (tests/client/client_handlers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from helpers import WORKER_KEY, wait_until

from spool.client import AsyncClient

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKER_TYPES = "debug.sleep,debug.noop,client.reverse"
#: short leases so a restarted control plane settles quickly
CONTROL_SETTINGS: dict[str, Any] = {"lease_s": 5.0, "heartbeat_s": 0.5}


class WorkerProcess:
    """One `spool-worker` subprocess (log in `log_path`), stopped with SIGTERM."""

    def __init__(self, server: str, tmp: Path) -> None:
        self.worker_id = f"w-{uuid.uuid4().hex[:8]}"
        self.log_path = tmp / f"{self.worker_id}.log"
        env = {
            **os.environ,
            "SPOOL_SERVER": server,
            "SPOOL_TOKEN": WORKER_KEY,
            "SPOOL_WORKER_ID": self.worker_id,
            "SPOOL_WORKER_NAME": self.worker_id,
            "SPOOL_WORKER_TYPES": WORKER_TYPES,
            "SPOOL_WORKER_HANDLERS": "client_handlers:Reverse",
            "SPOOL_WORKER_STATE_DIR": str(tmp / f"{self.worker_id}.state"),
            "SPOOL_WORKER_WORKDIR": str(tmp / f"{self.worker_id}.work"),
            "SPOOL_DRAIN_GRACE_S": "1",
            "SPOOL_DEVICE": "cpu",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.main"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after 10 s; reap."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_worker(cp: Any, tmp: Path, client: AsyncClient) -> AsyncIterator[WorkerProcess]:
    """A worker process connected to `cp` (waits until ListWorkers shows it)."""
    worker = WorkerProcess(cp.address, tmp)
    try:

        async def connected() -> bool:
            assert worker.proc.poll() is None, worker.log()
            return any(w.id == worker.worker_id for w in await client.workers())

        await wait_until(connected, timeout=30, interval=0.1, message="worker did not connect")
        yield worker
    except BaseException:
        print(f"---- log of {worker.worker_id} ----\n{worker.log()[-4000:]}")
        raise
    finally:
        await worker.stop()
