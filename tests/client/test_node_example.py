"""examples/node/submit_and_watch.js runs against a real control plane and worker.

Skipped (with the reason) when `node`/`npm` are missing or `npm install` cannot
fetch @grpc/grpc-js and @grpc/proto-loader from the registry.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import TENANT_A_KEY

from spool.client import AsyncClient
from spool.v1 import job_pb2

pytestmark = pytest.mark.timeout(240)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
MODULES = EXAMPLE / "node_modules"


def _npm_install() -> str | None:
    """Install the example's packages once; the reason to skip, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if (MODULES / "@grpc" / "grpc-js").is_dir() and (MODULES / "@grpc" / "proto-loader").is_dir():
        return None
    command = ["npm", "ci" if (EXAMPLE / "package-lock.json").exists() else "install"]
    try:
        done = subprocess.run(
            [*command, "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        return "npm install timed out"
    if done.returncode != 0:
        return f"npm install failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


async def test_node_client_submits_and_watches(cp: Any, worker: Any) -> None:
    reason = await asyncio.to_thread(_npm_install)
    if reason:
        pytest.skip(reason)
    proc = await asyncio.create_subprocess_exec(
        "node",
        "submit_and_watch.js",
        "0.5",
        cwd=EXAMPLE,
        env={"PATH": os.environ["PATH"], "SPOOL_SERVER": cp.address, "SPOOL_TOKEN": TENANT_A_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    out = stdout.decode()
    print(out)
    assert proc.returncode == 0, out + stderr.decode()
    lines = out.splitlines()
    assert lines[0].startswith("submitted ")
    assert any(" progress " in line and "steps" in line for line in lines), out
    assert lines[-1].endswith(" SUCCEEDED")
    # The events printed are the job's whole history, each once and in order.
    seqs = [int(line.split()[0][1:]) for line in lines if line.startswith("#")]
    assert seqs == list(range(1, len(seqs) + 1))
    job_id = lines[0].split()[1]
    async with AsyncClient(cp.address, token=TENANT_A_KEY) as client:
        job = await client.get(job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.last_seq == seqs[-1]
    assert job.labels["example"] == "node"
