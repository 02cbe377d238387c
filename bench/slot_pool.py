"""The worker's slot pool alone: no-op jobs per second, thread vs process isolation.

    python -m bench.slot_pool                       # 2,000 jobs per case, 2 slots, 3 reps
    python -m bench.slot_pool --jobs 500 --reps 1   # quick

Each case starts a `SlotPool` (the agent's only way to run jobs), keeps every
slot busy by starting the next job from `on_done`, and times `--jobs` no-op
jobs from the first `start_job` to the last `on_done`, on one event loop as
in the agent. Cases: `bench.noop_*` returns at once, `bench.workdir_*` also
touches `ctx.workdir` (a mkdtemp + rmtree: what every job paid before the
work directory was made on first use); `_thread` types run on pool threads,
`_process` types in slot processes (one pipe round trip per job). The
figure is the median of `--reps` repetitions, cases interleaved. Nothing
here talks to the control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from worker._outcome import Outcome
from worker._slots import SlotCallbacks, SlotPool

CASES = ("bench.noop_thread", "bench.noop_process", "bench.workdir_thread",
         "bench.workdir_process")  # fmt: skip


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of `pids` so far."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def run_case(job_type: str, jobs: int, slots: int, root: Path) -> tuple[float, float]:
    """(jobs per second, CPU µs per job in all processes) of `jobs` jobs through a fresh pool."""
    ready, done = asyncio.Event(), asyncio.Event()
    state = {"running": False, "started": 0, "finished": 0}

    def start_next() -> None:
        # As the agent does: a job per free slot (its credits), from on_idle.
        while state["started"] < jobs and pool.idle_count() > 0:
            n = state["started"]
            state["started"] += 1
            job_id = f"j{n:08d}"
            job = {"job_id": job_id, "attempt": 1, "type": job_type, "params": {},
                   "inputs": [], "tenant": "bench"}  # fmt: skip
            if pool.start_job((job_id, 1), job) is None:
                raise RuntimeError("no free slot although idle_count() > 0")

    def on_idle() -> None:
        if state["running"]:
            start_next()
        elif pool.idle_count() == slots:  # every slot process is up
            ready.set()

    def on_done(key: Any, outcome: Outcome) -> None:
        if outcome.status != "completed":
            raise RuntimeError(f"{key}: {outcome}")
        state["finished"] += 1
        if state["finished"] == jobs:
            done.set()

    config = {"handlers": "bench._pool_handlers", "types": [job_type], "device": "cpu",
              "workdir_root": str(root), "log_level": "WARNING", "file_root": ""}  # fmt: skip
    callbacks = SlotCallbacks(on_idle=on_idle, on_progress=lambda k, p: None, on_done=on_done)
    pool = SlotPool(slots, config, callbacks)
    try:
        await pool.start()
        if pool.idle_count() < slots:
            await ready.wait()
        pids = [slot.process.pid for slot in pool.slots]
        state["running"] = True
        c0, t0 = cpu_seconds(pids), time.perf_counter()
        start_next()
        await done.wait()
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
        return jobs / wall, cpu / jobs * 1e6
    finally:
        await pool.stop()


async def main_async(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in args.cases}
    with tempfile.TemporaryDirectory(prefix="spool-pool-bench-") as tmp:
        for rep in range(args.reps):
            for case in args.cases:
                rate, cpu_us = await run_case(case, args.jobs, args.slots, Path(tmp))
                results[case].append((rate, cpu_us))
                print(f"rep {rep + 1} {case:24s} {rate:8.0f} jobs/s {cpu_us:6.0f} CPU µs/job",
                      flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    args = ap.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(f"\n{args.jobs} no-op jobs per case, {args.slots} slots, median of {args.reps}:")
    print("| case | jobs/s | wall µs/job | CPU µs/job (all processes) |\n|---|---|---|---|")
    for case, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu_us = statistics.median(c for _, c in runs)
        print(f"| {case} | {rate:,.0f} | {1e6 / rate:,.0f} | {cpu_us:,.0f} |")


if __name__ == "__main__":
    main()
