"""Dispatch and cancel latency of one control plane on an embedded Postgres.

    python -m bench.dispatch [--jobs 300] [--cancels 50] [--workers 4]

- **dispatch latency**: `Submit` RPC issued → `Assign` received by an idle worker.
  The workers are scripted Connect clients in this process (each holds one
  credit, completes every job at once and re-announces its credit), so the
  figure is the control plane's: submit transaction, NOTIFY, claim, Assign.
- **cancel latency**: `Cancel` RPC issued → the handler observes
  `ctx.cancelled`, in a real `spool-worker` process running the probe handler
  below; the handler stamps the wall-clock moment it saw the cancel.

Jobs are submitted one at a time, each after the previous was measured, so
the figures are latencies with idle workers, not throughput. Prints the
figures and appends them to bench/report.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from worker.sdk import Handler, JobContext

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "report.md"
WORKER_KEY = "bench-worker-key"
CLIENT_KEY = "bench-client-key"


# ------------------------------------------------------------- the probe handler


class ProbeParams(BaseModel):
    stamp: str
    max_s: float = 30.0


class CancelProbe(Handler):
    """Polls `ctx.cancelled` every millisecond; writes the moment it turns true."""

    name = "bench.cancel_probe"
    Params = ProbeParams

    def run(self, ctx: JobContext, params: ProbeParams) -> dict:
        ctx.progress(0.0, stage="waiting for cancel")
        end = time.monotonic() + params.max_s
        while time.monotonic() < end:
            if ctx.cancelled:
                Path(params.stamp).write_text(repr(time.time()))
                ctx.check_cancelled()
            time.sleep(0.001)
        return {}


# ------------------------------------------------------------------- measuring


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(_pct(ms, 0.50), 2),
        "p99_ms": round(_pct(ms, 0.99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
    }


async def _scripted_worker(
    address: str, index: int, assigned: dict[str, float], arrived: asyncio.Event, stop
):
    """One idle worker: one credit, completes each Assign at once, asks again."""
    import grpc

    from spool.v1 import worker_service_pb2 as W
    from spool.v1 import worker_service_pb2_grpc as WG

    Req = W.ConnectRequest
    out: asyncio.Queue[Any] = asyncio.Queue()
    out.put_nowait(
        Req(hello=Req.Hello(worker_id=f"bench-{index}", job_types=["debug.noop"], slots=1))
    )
    out.put_nowait(Req(ready=Req.Ready(credits=1)))

    async def requests():
        while (msg := await out.get()) is not None:
            yield msg

    async with grpc.aio.insecure_channel(address) as channel:
        call = WG.WorkerServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {WORKER_KEY}"),)
        )
        reader = asyncio.ensure_future(call.read())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                reader.cancel()
                break
            msg = reader.result()
            if msg is grpc.aio.EOF:
                break
            if msg.WhichOneof("message") == "assign":
                assigned[msg.assign.job.id] = time.perf_counter()
                arrived.set()
                ref = W.AttemptRef(job_id=msg.assign.job.id, attempt=msg.assign.attempt)
                out.put_nowait(Req(completed=Req.Completed(ref=ref)))
                out.put_nowait(Req(ready=Req.Ready(credits=1)))
            reader = asyncio.ensure_future(call.read())
        out.put_nowait(None)
        call.cancel()


async def measure_dispatch(
    address: str, jobs: int, workers: int
) -> tuple[list[float], list[float]]:
    """Submit → Assign received (and Submit → response), one job at a time, idle workers."""
    import grpc

    from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

    assigned: dict[str, float] = {}
    arrived = asyncio.Event()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_scripted_worker(address, i, assigned, arrived, stop))
        for i in range(workers)
    ]

    async def assign_of(job_id: str) -> float:
        while job_id not in assigned:
            arrived.clear()
            await arrived.wait()
        return assigned[job_id]

    md = (("authorization", f"Bearer {CLIENT_KEY}"),)
    latencies: list[float] = []
    submit_ms: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        # Warm up: every worker connected and idle, connections pooled.
        for _ in range(workers * 3):
            req = job_service_pb2.SubmitRequest(job=job_pb2.JobSpec(type="debug.noop"))
            job = (await stub.Submit(req, metadata=md)).job
            await assign_of(job.id)
        for _ in range(jobs):
            req = job_service_pb2.SubmitRequest(job=job_pb2.JobSpec(type="debug.noop"))
            t0 = time.perf_counter()
            job = (await stub.Submit(req, metadata=md)).job
            submit_ms.append((time.perf_counter() - t0) * 1000)
            latencies.append((await assign_of(job.id) - t0) * 1000)
            await asyncio.sleep(0.01)  # let the worker complete and re-announce its credit
    stop.set()
    await asyncio.gather(*tasks)
    return latencies, submit_ms


async def measure_cancel(address: str, cancels: int, tmp: Path) -> list[float]:
    """Cancel RPC → the probe handler in a real spool-worker sees ctx.cancelled."""
    import grpc

    from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

    proc, log = _start_probe_worker(address, tmp)
    md = (("authorization", f"Bearer {CLIENT_KEY}"),)
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            for i in range(cancels + 3):
                stamp = tmp / f"stamp-{i}"
                spec = job_pb2.JobSpec(type="bench.cancel_probe")
                spec.params.update({"stamp": str(stamp)})
                job = (await stub.Submit(job_service_pb2.SubmitRequest(job=spec), metadata=md)).job
                # Wait until the handler runs (its first progress is stored).
                while True:
                    got = await stub.Get(job_service_pb2.GetRequest(job_id=job.id), metadata=md)
                    if got.job.state == job_pb2.JOB_STATE_RUNNING and got.job.HasField("progress"):
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                t0 = time.time()
                await stub.Cancel(job_service_pb2.CancelRequest(job_id=job.id), metadata=md)
                # The handler stamps the moment it saw the cancel; reading it later is fine.
                while not stamp.exists() or not stamp.read_text():  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                if i >= 3:  # the first ones warm up the slot process
                    latencies.append((float(stamp.read_text()) - t0) * 1000)
                while True:
                    got = await stub.Get(job_service_pb2.GetRequest(job_id=job.id), metadata=md)
                    if got.job.state == job_pb2.JOB_STATE_CANCELED:
                        break
                    await asyncio.sleep(0.005)
    finally:
        await asyncio.to_thread(_stop_process, proc)
        log.close()
    return latencies


def _start_probe_worker(address: str, tmp: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """A spool-worker serving only the cancel probe; its log in tmp/worker.log."""
    env = {
        **os.environ,
        "SPOOL_SERVER": address,
        "SPOOL_TOKEN": WORKER_KEY,
        "SPOOL_WORKER_ID": "bench-cancel",
        "SPOOL_WORKER_TYPES": "bench.cancel_probe",
        "SPOOL_WORKER_HANDLERS": "bench.dispatch:CancelProbe",
        "SPOOL_WORKER_STATE_DIR": str(tmp / "state"),
        "SPOOL_WORKER_WORKDIR": str(tmp / "work"),
        "SPOOL_DEVICE": "cpu",
        "SPOOL_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
    }
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.main"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    return proc, log


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from control.config import Settings
    from control.server import start_server

    with tempfile.TemporaryDirectory(prefix="spool-bench-") as tmpdir:
        tmp = Path(tmpdir)
        settings = Settings(
            listen="127.0.0.1:0",
            data_dir=str(tmp / "data"),
            database_url=args.database_url,
            auth=True,
            api_keys=f"{CLIENT_KEY}:bench:client,{WORKER_KEY}:bench:worker",
            log_level="WARNING",
        )
        cp = await start_server(settings)
        try:
            dispatch_ms, submit_ms = await measure_dispatch(cp.address, args.jobs, args.workers)
            cancel_ms = await measure_cancel(cp.address, args.cancels, tmp)
        finally:
            await cp.stop(1)
    return {
        "dispatch": _summary(dispatch_ms),
        "submit_rpc": _summary(submit_ms),
        "cancel": _summary(cancel_ms),
    }


def _append_report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    d, s, c = figures["dispatch"], figures["submit_rpc"], figures["cancel"]
    lines = [
        "",
        f"## Dispatch and cancel latency ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"`python -m bench.dispatch --jobs {args.jobs} --cancels {args.cancels}"
        f" --workers {args.workers}` on {platform.node()} ({os.cpu_count()} cores),"
        f" Python {platform.python_version()}, "
        + ("embedded Postgres" if not args.database_url else "external Postgres"),
        "",
        "| latency | n | p50 ms | p99 ms | mean ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| dispatch: Submit RPC → Assign received (idle workers) | {d['n']} | {d['p50_ms']}"
        f" | {d['p99_ms']} | {d['mean_ms']} | {d['max_ms']} |",
        f"| (of which the Submit RPC alone) | {s['n']} | {s['p50_ms']}"
        f" | {s['p99_ms']} | {s['mean_ms']} | {s['max_ms']} |",
        f"| cancel: Cancel RPC → handler sees ctx.cancelled | {c['n']} | {c['p50_ms']}"
        f" | {c['p99_ms']} | {c['mean_ms']} | {c['max_ms']} |",
        "",
    ]
    if not REPORT.exists():
        REPORT.write_text("# Benchmark report\n")
    with REPORT.open("a") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Measure, print, append to bench/report.md."""
    p = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__)
    p.add_argument("--jobs", type=int, default=300, help="dispatch samples")
    p.add_argument("--cancels", type=int, default=50, help="cancel samples")
    p.add_argument("--workers", type=int, default=4, help="idle scripted workers")
    p.add_argument(
        "--database-url",
        default=os.environ.get("SPOOL_DATABASE_URL", ""),
        help="Postgres to use (default: an embedded one in a temp dir)",
    )
    p.add_argument("--no-report", action="store_true", help="do not append to bench/report.md")
    args = p.parse_args(argv)
    figures = asyncio.run(run(args))
    print(json.dumps(figures, indent=2))
    if not args.no_report:
        _append_report(figures, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
