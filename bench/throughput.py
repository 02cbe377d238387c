"""No-op job throughput, round trip and CPU per job: Spool beside pgqueuer and Celery, one run.

    python -m bench.throughput                 # 20,000 jobs a scenario, 2,000 samples, 3 reps
    python -m bench.throughput --quick         # 1,000 jobs, 200 samples (2-3 minutes)
    python -m bench.throughput --systems spool --jobs 200 --samples 50 --reps 1

One private Postgres (pgserver) serves every system. Each repetition starts
every system afresh (a new database each; Redis flushed), then runs, for each
scenario in turn, every system one after the other (the order rotates each
repetition): N no-op jobs submitted (a) in batches of 500, (b) one at a time
by one caller, (c) one at a time by 64 concurrent callers; jobs/s is N over
the time from the first submit to the moment all N were seen done (how each
system is asked: bench/systems.py). CPU per job is the utime+stime of every
process involved during that window (client = this process, control plane,
workers with their children, Postgres with its backends, redis-server), over
N. Then the round trip: one job submitted and its completion awaited, M
times, with idle workers. Figures are medians over the repetitions, with the
range. Ceilings of the same machine follow: pgbench -N TPS on the same
Postgres and a grpc.aio unary echo in this process.

`--profile DIR` adds one batched Spool run under py-spy (control plane and
worker) after the measured ones and prints where their time goes.

Prints the section and appends it to bench/report.md (unless --no-report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import systems as S

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "report.md"
#: scenario key -> row label (the concurrency is filled in)
SCENARIOS = {
    "batched": "jobs/s, batched submit ({batch} a batch)",
    "sequential": "jobs/s, one submit at a time, 1 caller",
    "concurrent": "jobs/s, one submit at a time, {concurrency} concurrent callers",
}
ROUND_TRIP_ROW = "round trip p50 / p99 ms (submit → done seen, idle workers)"
CPU_ROW = "CPU µs per job, {scenario} (all processes)"
ALL_SYSTEMS = ("spool", "pgqueuer", "celery")


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries only the section."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -------------------------------------------------------------------- measuring


async def measure(system: Any, scenario: str, args: argparse.Namespace, pg_pid: int) -> dict:
    """One scenario on one system: jobs/s and CPU µs per job, by process group."""
    roots = {"client": (os.getpid(), False), **system.cpu_roots()}
    if system.name != "Celery":
        roots["postgres"] = (pg_pid, True)
    await system.begin()
    cpu0 = S.cpu_seconds(roots)
    t0 = time.perf_counter()
    if scenario == "batched":
        await system.submit_batched(args.jobs, args.batch)
    else:
        await system.submit_single(args.jobs, 1 if scenario == "sequential" else args.concurrency)
    t_submitted = time.perf_counter()
    await system.wait_done()
    t1 = time.perf_counter()
    cpu1 = S.cpu_seconds(roots)
    by_group = {k: (cpu1[k] - cpu0[k]) * 1e6 / args.jobs for k in roots}
    return {
        "jobs_per_s": args.jobs / (t1 - t0),
        "seconds": t1 - t0,
        "submit_s": t_submitted - t0,
        "cpu_us": sum(by_group.values()),
        "cpu_by_group": by_group,
    }


async def run_systems(args: argparse.Namespace, pg: Any, pg_pid: int, tmp: Path) -> dict:
    """All repetitions, interleaved; returns figures, configurations and skip reasons."""
    systems, skipped = [], {}
    for key in args.systems:
        try:
            if key == "spool":
                systems.append(S.SpoolSystem(pg, tmp, args.spool_workers, args.spool_worker_arg))
            elif key == "pgqueuer":
                systems.append(
                    S.PgqueuerSystem(
                        pg, tmp, args.pgq_batch_size, args.pgq_rt_batch_size, args.pgq_pool
                    )
                )
            elif key == "celery":
                systems.append(S.CelerySystem(tmp, args.celery_concurrency, args.concurrency))
        except S.Skip as exc:
            skipped[key] = str(exc)
            log(f"skipping {key}: {exc}")
    figures: dict[str, dict[str, list]] = {s.name: {} for s in systems}
    failed: dict[str, str] = {}

    async def attempt(system: Any, what: str, coro: Any) -> Any:
        if system.name in failed:
            coro.close()
            return None
        try:
            return await coro
        except Exception as exc:
            failed[system.name] = f"{what}: {type(exc).__name__}: {exc}"
            log(f"{system.name} failed during {what}: {exc!r}")
            with contextlib.suppress(Exception):
                await system.stop()
            return None

    try:
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for s in order:
                log(f"rep {rep + 1}/{args.reps}: starting {s.name}")
                await attempt(s, "start", s.start(rep))
            for scenario in args.scenarios:
                for s in order:
                    got = await attempt(s, scenario, measure(s, scenario, args, pg_pid))
                    if got is not None:
                        figures[s.name].setdefault(scenario, []).append(got)
                        log(
                            f"rep {rep + 1}: {s.name} {scenario}: {got['jobs_per_s']:.0f} jobs/s,"
                            f" {got['cpu_us']:.0f} µs CPU/job ({got['seconds']:.1f} s)"
                        )
            for s in order if args.samples > 0 else ():
                ms = await attempt(s, "round trip", s.round_trip(args.samples))
                if ms:
                    rt = {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "n": len(ms)}
                    figures[s.name].setdefault("round_trip", []).append(rt)
                    log(
                        f"rep {rep + 1}: {s.name} round trip"
                        f" p50 {rt['p50']:.1f} p99 {rt['p99']:.1f} ms"
                    )
            for s in order:
                if s.name not in failed:
                    await s.stop()
        if args.profile and any(s.name == "Spool" for s in systems):
            spool = next(s for s in systems if s.name == "Spool")
            figures["_profile"] = await profile_spool(spool, args, tmp)
    finally:
        for s in systems:
            if hasattr(s, "close"):
                with contextlib.suppress(Exception):
                    await s.close()
    return {
        "figures": figures,
        "configs": {s.name: s.config for s in systems},
        "observed": {s.name: s.observed for s in systems},
        "skipped": skipped,
        "failed": failed,
    }


# ---------------------------------------------------------------------- py-spy


#: frames of our own code, for the inclusive view of a profile
PROJECT_PREFIXES = ("control/", "worker/", "spool/")


def _package(frame: str) -> str:
    """`execute (sqlalchemy/engine/base.py)` -> `sqlalchemy`; stdlib modules by name."""
    path = frame[frame.rfind(" (") + 2 : -1]
    return path.split("/", 1)[0].removesuffix(".py") if "/" in path else path.removesuffix(".py")


def summarize_pyspy(raw: Path, top: int = 12) -> dict[str, Any]:
    """Where the samples of py-spy's raw (collapsed-stack) output are, as % of all samples.

    - self: the innermost frame per function (line numbers dropped);
    - inclusive: functions of Spool's own code (control/, worker/, spool/) on the stack;
    - packages: self time by the package of the innermost frame;
    - children: with `--subprocesses`, the share of samples in child processes.
    """
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    pkg_n: dict[str, int] = {}
    total = in_children = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        if sum(p.startswith("process ") for p in parts) > 1:
            in_children += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in parts if f.endswith(")") and " (" in f]
        if not frames:
            continue
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        pkg = _package(frames[-1])
        pkg_n[pkg] = pkg_n.get(pkg, 0) + n
        for f in set(frames):
            if f[f.rfind(" (") + 2 :].startswith(PROJECT_PREFIXES) and not f.startswith(
                ("<module> (", "main (")
            ):
                incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return {"self": [], "inclusive": [], "packages": [], "samples": 0, "children": 0.0}

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, 100 * n / total) for f, n in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {
        "self": ranked(self_n),
        "inclusive": ranked(incl_n),
        "packages": ranked(pkg_n),
        "samples": total,
        "children": 100 * in_children / total,
    }


def _start_pyspy(pyspy: str, targets: dict[str, int], out_dir: Path) -> dict:
    """`py-spy record` on each pid: raw output, only samples holding the GIL (idle waits in C
    are not time spent), not pausing the target; the worker with its slot processes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = {}
    for name, pid in targets.items():
        raw = out_dir / f"{name}.txt"
        cmd = [pyspy, "record", "--pid", str(pid), "-f", "raw", "-o", str(raw)]
        cmd += ["--gil", "--nonblocking"]
        if name == "worker":
            cmd.append("--subprocesses")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        recorders[name] = (proc, raw)
    return recorders


async def profile_spool(spool: Any, args: argparse.Namespace, tmp: Path) -> dict:
    """One extra Spool run (batched unless --profile-scenario says) with py-spy recording
    the control plane and the worker."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not await asyncio.to_thread(Path(pyspy).exists):
        return {"error": "py-spy not found (pip install py-spy)"}
    await spool.start(args.reps)
    recorders = {}
    try:
        targets = {"control": spool.cp.pid, "worker": spool.workers[0].pid}
        recorders = await asyncio.to_thread(_start_pyspy, pyspy, targets, Path(args.profile))
        await asyncio.sleep(1.0)
        log(f"profiling: one {args.profile_scenario} Spool run under py-spy")
        got = await measure(spool, args.profile_scenario, args, 0)
    finally:
        for proc, _ in recorders.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in recorders.values():
            await asyncio.to_thread(proc.wait, 30)
        await spool.stop()
    result = {"jobs_per_s": got["jobs_per_s"], "dir": str(args.profile)}
    for name, (proc, raw) in recorders.items():
        if raw.exists():
            result[name] = summarize_pyspy(raw)
        else:
            result[name] = {"error": (proc.stderr.read() or b"").decode()[-300:]}
    return result


# --------------------------------------------------------------------- ceilings


def find_pgbench() -> str | None:
    """pgserver ships pgbench beside its postgres; else one on PATH."""
    with contextlib.suppress(Exception):
        from control.embedded import _pgserver

        candidate = Path(_pgserver().__file__).parent / "pginstall" / "bin" / "pgbench"
        if candidate.exists():
            return str(candidate)
    return shutil.which("pgbench")


async def pgbench_tps(pg: Any, seconds: float, clients: int) -> dict:
    """`pgbench -N` (no updates of the small tables) against the same Postgres."""
    from control.db import libpq_url

    binary = find_pgbench()
    if binary is None:
        return {"error": "pgbench not found (pgserver has none here and none is on PATH)"}
    url = libpq_url(pg.create_database("pgbench_bench"))

    def run(cmd: list[str]) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-300:])
        return done.stdout

    try:
        await asyncio.to_thread(run, [binary, "-i", "-q", "-s", "1", url])
        jobs = min(clients, os.cpu_count() or 1)
        cmd = [binary, "-N", "-n", "-c", str(clients), "-j", str(jobs), "-T", str(int(seconds))]
        out = await asyncio.to_thread(run, [*cmd, url])
    except Exception as exc:
        return {"error": f"pgbench failed: {exc}"}
    match = re.search(r"tps = ([0-9.]+)", out)
    return {
        "tps": float(match.group(1)) if match else None,
        "command": f"pgbench -N -n -c {clients} -j {jobs} -T {int(seconds)}",
        "binary": binary,
    }


async def grpc_echo(seconds: float, concurrency: int) -> dict:
    """Unary echo RPCs/s on grpc.aio, server and client in this process (bytes, no protobuf)."""
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            for _ in range(200):
                await call(b"x" * 32)
            for label, callers in (("sequential", 1), ("concurrent", concurrency)):
                count = 0
                end = time.perf_counter() + seconds

                async def caller(end: float = end) -> None:
                    nonlocal count
                    while time.perf_counter() < end:
                        await call(b"x" * 32)
                        count += 1

                t0 = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(callers)))
                out[label] = count / (time.perf_counter() - t0)
    finally:
        await server.stop(0)
    return out


# ---------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> dict:
    from control.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="spool-throughput-"))
    pg = EmbeddedPostgres(tmp / "pg", delete_on_stop=True)
    await asyncio.to_thread(pg.start)
    try:
        pg_pid = int((tmp / "pg" / "postmaster.pid").read_text().split()[0])
        result = await run_systems(args, pg, pg_pid, tmp)
        result["ceilings"] = {}
        if args.pgbench_seconds > 0:
            log(f"ceiling: pgbench -N for {args.pgbench_seconds:.0f} s")
            result["ceilings"]["pgbench"] = await pgbench_tps(
                pg, args.pgbench_seconds, args.pgbench_clients
            )
        if args.echo_seconds > 0:
            log("ceiling: grpc.aio echo")
            result["ceilings"]["echo"] = await grpc_echo(args.echo_seconds, args.concurrency)
        result["postgres"] = pg.url().split("?")[0]
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---------------------------------------------------------------------- report


def _med_range(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "—"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render(result: dict, args: argparse.Namespace, argv: list[str], seconds: float) -> str:
    """The markdown section: table, ratios, CPU breakdown, ceilings, configuration."""
    figures = result["figures"]
    names = [n for n in figures if not n.startswith("_")]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    lines = [
        f"## Throughput and round trip, Spool beside its peers ({when})",
        "",
        f"`python -m bench.throughput {' '.join(argv)}`".replace(" `", "`")
        + f" — {seconds:.0f} s on {platform.node()} ({os.cpu_count()} cores, load average"
        f" {load[0]:.2f} at the end), Python {platform.python_version()},"
        f" grpcio {_version('grpcio')}, one embedded Postgres (pgserver) for all."
        f" {args.jobs:,} no-op jobs a scenario, {args.samples:,} round-trip samples,"
        f" {args.reps} interleaved repetitions: median (min-max).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    fmt_args = {"batch": args.batch, "concurrency": args.concurrency}
    for key, label in SCENARIOS.items():
        cells = [_med_range([r["jobs_per_s"] for r in figures[n].get(key, [])]) for n in names]
        lines.append(f"| {label.format(**fmt_args)} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        rts = figures[n].get("round_trip", [])
        if not rts:
            cells.append("—")
            continue
        p50, p99 = [r["p50"] for r in rts], [r["p99"] for r in rts]
        cells.append(
            f"{statistics.median(p50):.1f} / {statistics.median(p99):.1f}"
            + (f" (p50 {min(p50):.1f}-{max(p50):.1f})" if len(rts) > 1 else "")
        )
    lines.append(f"| {ROUND_TRIP_ROW} | " + " | ".join(cells) + " |")
    for key in SCENARIOS:
        cells = [_med_range([r["cpu_us"] for r in figures[n].get(key, [])]) for n in names]
        lines.append(f"| {CPU_ROW.format(scenario=key)} | " + " | ".join(cells) + " |")
    lines.append("")

    peers = [n for n in names if n != "Spool"]
    if "Spool" in names and peers:
        lines += ["Spool / peer, from the medians (throughput: higher is better; "
                  "round trip and CPU: lower is better):", ""]  # fmt: skip
        lines += ["| | " + " | ".join(f"Spool / {p}" for p in peers) + " |"]
        lines += ["|---|" + "---:|" * len(peers)]

        def med(n: str, key: str, field: str) -> float | None:
            vals = [r[field] for r in figures[n].get(key, [])]
            return statistics.median(vals) if vals else None

        rows = [(SCENARIOS[k].format(**fmt_args), k, "jobs_per_s") for k in SCENARIOS]
        rows += [("round trip p50", "round_trip", "p50"), ("round trip p99", "round_trip", "p99")]
        rows += [(CPU_ROW.format(scenario="batched"), "batched", "cpu_us")]
        for label, key, field in rows:
            cells = []
            for p in peers:
                a, b = med("Spool", key, field), med(p, key, field)
                cells.append(f"{a / b:.2f}x" if a and b else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["CPU µs per job by process, medians (batched / 1 caller / concurrent):", ""]
    for n in names:
        groups = {}
        for key in SCENARIOS:
            for r in figures[n].get(key, []):
                for g, v in r["cpu_by_group"].items():
                    groups.setdefault(g, {}).setdefault(key, []).append(v)
        parts = [
            f"{g} "
            + " / ".join(f"{statistics.median(v[k]):,.0f}" if k in v else "—" for k in SCENARIOS)
            for g, v in groups.items()
        ]
        lines.append(f"- {n}: " + "; ".join(parts))
    lines.append("")

    ceil = result.get("ceilings", {})
    lines += ["Ceilings, same run:", ""]
    pgb = ceil.get("pgbench")
    if pgb is None:
        lines.append("- pgbench: not run")
    elif "error" in pgb:
        lines.append(f"- pgbench: skipped — {pgb['error']}")
    else:
        lines.append(
            f"- pgbench on the same Postgres: {pgb['tps']:,.0f} TPS (`{pgb['command']}`,"
            f" scale 1, pgserver's {Path(pgb['binary']).name})"
        )
    echo = ceil.get("echo")
    if echo:
        lines.append(
            f"- grpc.aio unary echo, in-process: {echo['sequential']:,.0f} RPC/s from 1 caller,"
            f" {echo['concurrent']:,.0f} RPC/s from {args.concurrency} callers"
        )
    else:
        lines.append("- grpc.aio echo: not run")
    lines.append("")

    lines += ["Configuration and how done is seen:", ""]
    for n, config in result["configs"].items():
        lines.append(f"- {n}: {config}")
    poll_ms = S.POLL_S * 1000
    lines.append(
        f"- how each system is watched (polled every {poll_ms:.0f} ms after the last submit):"
    )
    for n, observed in result["observed"].items():
        lines.append(f"  - {n}: {observed}")
    lines.append(
        "- CPU: utime+stime from /proc of this process (the clients), the control plane,"
        " the workers and their children, Postgres and its backends (not for Celery), and"
        " redis-server, over the window first submit → all done; every system stays up"
        " through a repetition, so Postgres's figure includes the others' idle background"
    )
    for key, why in result["skipped"].items():
        lines.append(f"- **{key} skipped**: {why}")
    for n, why in result["failed"].items():
        lines.append(f"- **{n} failed** ({why}); its figures are from the repetitions before")

    prof = figures.get("_profile")
    if prof:
        lines += ["", f"py-spy profile of one {args.profile_scenario} Spool run (not timed above; "
                  f"{prof.get('jobs_per_s', 0):.0f} jobs/s under the profiler):", ""]  # fmt: skip
        for proc in ("control", "worker"):
            p = prof.get(proc, {})
            if "error" in p:
                lines.append(f"- {proc}: {p['error']}")
                continue
            head = f"- {proc}: {p.get('samples', 0)} samples holding the GIL"
            if proc == "worker":
                head += f", {p.get('children', 0):.0f} % of them in slot processes"
            lines.append(head + "; self time by package: " + ", ".join(
                f"{name} {share:.0f} %" for name, share in p.get("packages", [])[:8]))  # fmt: skip
            lines.append("  - self time, top 10: " + "; ".join(
                f"`{f}` {share:.1f} %" for f, share in p.get("self", [])[:10]))  # fmt: skip
            lines.append("  - inclusive, Spool's own functions: " + "; ".join(
                f"`{f}` {share:.1f} %" for f, share in p.get("inclusive", [])[:10]))  # fmt: skip
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the section, append it to bench/report.md."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--quick", action="store_true", help="1,000 jobs, 200 samples, pgbench 5 s")
    a("--jobs", type=int, help="no-op jobs per scenario (default 20,000; --quick 1,000)")
    a("--samples", type=int, help="round-trip samples (default 2,000; --quick 200)")
    a("--reps", type=int, default=3, help="interleaved repetitions")
    a("--systems", default=",".join(ALL_SYSTEMS), help="comma list of spool,pgqueuer,celery")
    a("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    a("--batch", type=int, default=500, help="jobs per batched submit")
    a("--concurrency", type=int, default=64, help="concurrent single-submit callers")
    a("--spool-workers", default="1x8", help="Spool worker processes x slots each")
    a("--spool-worker-arg", action="append", default=None,
      help="extra spool-worker flag (default: --prefetch=256; give '' for none)")  # fmt: skip
    a("--pgq-batch-size", type=int, default=10, help="pgqueuer QueueManager.run batch_size")
    a("--pgq-rt-batch-size", type=int, default=1, help="pgqueuer batch_size for round trip")
    a("--pgq-pool", type=int, default=30, help="asyncpg pool of the concurrent pgqueuer callers")
    a("--celery-concurrency", type=int, default=8, help="Celery prefork processes")
    a("--pgbench-seconds", type=float, help="pgbench -N duration (default 10; 0: skip)")
    a("--pgbench-clients", type=int, default=8, help="pgbench -c")
    a("--echo-seconds", type=float, help="grpc echo duration per mode (default 3; 0: skip)")
    a("--profile", metavar="DIR", help="also profile one batched Spool run with py-spy")
    a("--profile-scenario", default="batched", choices=list(SCENARIOS), help="what --profile runs")
    a("--json", metavar="PATH", help="also write every figure measured as JSON")
    a("--no-report", action="store_true", help="do not append to bench/report.md")
    args = p.parse_args(argv)
    args.jobs = args.jobs or (1_000 if args.quick else 20_000)
    args.samples = args.samples if args.samples is not None else (200 if args.quick else 2_000)
    if args.pgbench_seconds is None:
        args.pgbench_seconds = 5.0 if args.quick else 10.0
    if args.echo_seconds is None:
        args.echo_seconds = 2.0 if args.quick else 3.0
    if args.spool_worker_arg is None:
        # No-op jobs are the case prefetch is for: a slot never waits a round trip.
        args.spool_worker_arg = ["--prefetch=256"]
    args.spool_worker_arg = [a for a in args.spool_worker_arg if a]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenarios: {', '.join(sorted(set(args.scenarios) - set(SCENARIOS)))}")
    bad = set(args.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown systems: {', '.join(sorted(bad))}")
    t0 = time.perf_counter()
    result = asyncio.run(run(args))
    section = render(result, args, argv, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, **result}, indent=1, default=str))
    print("\n" + section, flush=True)
    if not args.no_report:
        if not REPORT.exists():
            REPORT.write_text("# Benchmark report\n")
        with REPORT.open("a") as f:
            f.write("\n" + section)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
