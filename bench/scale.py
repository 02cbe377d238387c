"""Scale: progress fan-out, a fleet on one control process, a 1,000,000-row jobs table.

    python -m bench.scale                  # 1,000 watchers; 200 workers + 1,000 watchers; 1M rows
    python -m bench.scale --quick          # 100 watchers; 20 + 100; 50,000 rows (about a minute)
    python -m bench.scale --scenarios table --rows 200000

One private Postgres (pgserver); each scenario gets its own database and a
fresh control process (`python -m control.main`, auth off, defaults), so the
peak RSS read from /proc/<pid>/status (VmHWM) is that scenario's alone.

1. **Progress fan-out.** One `debug.sleep` job reporting progress every
   `--interval` s (`--events` times), watched by `--watchers` concurrent
   `WatchProgress` streams (100 a connection) opened while the job is still
   queued; a real `spool-worker` is started once every watcher has its first
   event. Per progress event and watcher: the delay from the handler's report
   (`Progress.update_time`, stamped in the slot process) to the watcher
   receiving it, so the figure spans slot → agent → stream → control's
   progress write → NOTIFY → the job's feed → every stream. The interval is
   above the 0.2 s coalescing windows of the worker and the control plane, so
   no report waits in one. Errors: failed streams, watchers that missed an
   event or did not end with SUCCEEDED. Then the same fan-out through a bare
   grpc.aio server (bench/fanout_ceiling.py: raw bytes, no database): the
   transport's own delay and CPU per message on this machine.
2. **A fleet on one control process.** `--fleet-workers` worker streams played
   by `bench.scripted.ScriptedWorker` in this process (the real protocol, one
   TCP connection each; 200 real worker processes would not fit on 2 cores),
   running `debug.sleep` jobs of `--fleet-job-s` s submitted at `--fleet-rate`
   jobs/s in batches, and `--fleet-watchers` watchers, each watching a job
   submitted in the last 2 s to its end, then another, for `--fleet-seconds`.
   Then submitting stops and every job is waited for. Figures: the control
   process's peak RSS, jobs done, errors (failed RPCs, protocol surprises,
   jobs that did not succeed, watches that did not end with SUCCEEDED).
3. **A big jobs table** (bench/bigtable.py). Get p99 (random jobs), List
   first page p99 and dispatch throughput (`--dispatch-jobs` no-op jobs by
   SubmitBatch of 500, one `spool-worker` x 8 slots) on an empty table and on
   one holding `--rows` terminal jobs (3 events each) written by SQL
   (INSERT ... SELECT generate_series, then VACUUM ANALYZE): two databases and
   control processes, the calls taking turns between them; the ratio.
4. Cancel reaching running code is bench.dispatch's (its cancel row).

Prints the section and appends it to bench/report.md (unless --no-report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from bench import fanout_ceiling
from bench import systems as S
from bench.bigtable import NOT_DONE_SQL, STATES_OF_SQL, summary, table
from bench.scripted import OWN_CONNECTION, ScriptedWorker
from bench.throughput import log

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "report.md"
SCENARIOS = ("fanout", "fleet", "table")
#: database suffixes of SpoolSystem.start (spool_bench_r<N>); the table's: bench/bigtable.py
DB_OF = {"fanout": 901, "fleet": 902}
#: watch streams sharing one client connection
WATCHERS_PER_CHANNEL = 100
#: a fleet watcher picks a job submitted this recently (so it is still running)
FLEET_PICK_WINDOW_S = 2.0
#: submitted jobs of the fleet go in one SubmitBatch per this interval
FLEET_SUBMIT_TICK_S = 0.5
#: targets of issue 9
TARGET_FANOUT_P99_MS = 10.0
TARGET_RSS_MB = 500.0
TARGET_TABLE_RATIO = 2.0


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def start_worker(address: str, tmp: Path, name: str, types: str, slots: int) -> Any:
    """A real `python -m worker.main` (the environment SpoolSystem gives its workers)."""
    env = {
        "SPOOL_SERVER": address,
        "SPOOL_WORKER_ID": name,
        "SPOOL_WORKER_STATE_DIR": str(tmp / f"{name}-state"),
        "SPOOL_WORKER_WORKDIR": str(tmp / f"{name}-work"),
        "SPOOL_DEVICE": "cpu",
        "SPOOL_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "worker.main", "--slots", str(slots), "--types", types]
    return S.spawn(command, tmp / f"{name}.log", env)


def _cpu_roots(control_pid: int, pg: Any) -> dict[str, tuple[int, bool]]:
    """The processes whose CPU a scenario reports: control, the bench's clients, Postgres."""
    postmaster = int((Path(pg.pgdata) / "postmaster.pid").read_text().split()[0])
    return {
        "control": (control_pid, True),
        "bench": (os.getpid(), False),
        "postgres": (postmaster, True),
    }


def _channels(address: str, streams: int) -> list[Any]:
    import grpc

    count = max(1, -(-streams // WATCHERS_PER_CHANNEL))
    return [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(count)]


# ------------------------------------------------------------------- 1. fan-out


async def fanout(pg: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """N watchers on one job reporting progress; delay per (event, watcher)."""
    import grpc

    from spool.v1 import job_pb2
    from spool.v1 import job_service_pb2 as pb
    from spool.v1 import job_service_pb2_grpc as pbg

    n, duration = args.watchers, args.events * args.interval
    spool = S.SpoolSystem(pg, tmp, "0x1", [])
    await spool.start(DB_OF["fanout"])
    worker, channels, recorder = None, [], None
    errors: Counter[str] = Counter()
    try:
        spec = job_pb2.JobSpec(type="debug.sleep")
        spec.params.update({"duration": duration, "steps": args.events})
        job = (await spool.stub.Submit(pb.SubmitRequest(job=spec), timeout=30)).job
        channels = _channels(spool.address, n)
        # per watcher: (seq, kind, state, update_time or None, received at)
        got: list[list[tuple[int, int, int, float | None, float]]] = [[] for _ in range(n)]
        ended = 0

        async def watch(i: int) -> None:
            nonlocal ended
            stub = pbg.JobServiceStub(channels[i // WATCHERS_PER_CHANNEL])
            req = pb.WatchProgressRequest(job_id=job.id)
            try:
                async for resp in stub.WatchProgress(req, timeout=duration + 300):
                    now = time.time()
                    ev = resp.event
                    when = None
                    if ev.kind == job_pb2.JOB_EVENT_KIND_PROGRESS and ev.HasField("progress"):
                        ut = ev.progress.update_time
                        when = ut.seconds + ut.nanos / 1e9
                    got[i].append((ev.seq, ev.kind, ev.state, when, now))
            except grpc.aio.AioRpcError as exc:
                errors[f"watch stream failed: {exc.code().name}"] += 1
            finally:
                ended += 1

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(watch(i)) for i in range(n)]
        deadline = time.monotonic() + 120 + n / 10
        while sum(1 for g in got if g) + ended < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fan-out: only {sum(1 for g in got if g)} of {n} connected")
            await asyncio.sleep(0.02)
        connect_s = time.perf_counter() - t0
        log(f"fan-out: {n} watchers connected in {connect_s:.1f} s; starting the worker")
        roots = _cpu_roots(spool.cp.pid, pg)
        recorder = await _profile_start(args.profile, "fanout", spool.cp.pid)
        cpu0 = S.cpu_seconds(roots)
        worker = start_worker(spool.address, tmp, "fanout-worker", "debug.sleep", 1)
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 240)
        cpu1 = S.cpu_seconds(roots)
        profile = await _profile_stop(recorder)
        rss = proc_status_mb(spool.cp.pid)
        final = (await spool.stub.Get(pb.GetRequest(job_id=job.id), timeout=30)).job
    finally:
        _profile_abandon(recorder)
        await S.stop(worker)
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
        await spool.stop()

    expected = list(range(1, final.last_seq + 1))
    by_seq: dict[int, list[float]] = {}
    for events in got:
        if not events:
            continue
        if [e[0] for e in events] != expected:
            errors["watcher missed or repeated an event"] += 1
        if events[-1][2] != job_pb2.JOB_STATE_SUCCEEDED:
            errors["watch did not end with SUCCEEDED"] += 1
        for seq, _, _, when, received in events:
            if when is not None:
                by_seq.setdefault(seq, []).append((received - when) * 1000)
    if final.state != job_pb2.JOB_STATE_SUCCEEDED:
        errors[f"job ended in state {job_pb2.JobState.Name(final.state)}"] += 1
    pairs = [d for ds in by_seq.values() for d in ds]
    # The same fan-out through a bare grpc.aio server: what the transport alone costs here.
    log(f"fan-out: the transport's own ceiling ({n} watchers, bare grpc.aio)")
    ceiling = await fanout_ceiling.measure(n, args.events, args.interval, WATCHERS_PER_CHANNEL)
    return {
        "ceiling": ceiling,
        "watchers": n,
        "reported": args.events,
        "progress_events": len(by_seq),
        "pairs": summary(pairs),
        "first": summary([min(ds) for ds in by_seq.values()]),
        "last": summary([max(ds) for ds in by_seq.values()]),
        "connect_s": connect_s,
        "rss": rss,
        # CPU ms per progress event, from the worker's start to the last watcher's end
        "cpu_ms": {k: (cpu1[k] - cpu0[k]) * 1000 / max(1, len(by_seq)) for k in roots},
        "profile": profile,
        "errors": dict(errors),
    }


async def _profile_start(out_dir: str | None, scenario: str, pid: int) -> Any:
    """py-spy recording the control process (bench.throughput's way) into
    DIR/<scenario>/control.txt, or None."""
    if not out_dir:
        return None
    from bench import throughput

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not await asyncio.to_thread(Path(pyspy).exists):
        log("no py-spy: the fan-out is not profiled")
        return None
    recorders = await asyncio.to_thread(
        throughput._start_pyspy, pyspy, {"control": pid}, Path(out_dir) / scenario
    )
    await asyncio.sleep(1.0)
    return recorders["control"]


async def _profile_stop(recorder: Any) -> dict[str, Any] | None:
    if recorder is None:
        return None
    from bench import throughput

    proc, raw = recorder
    proc.send_signal(signal.SIGINT)
    await asyncio.to_thread(proc.wait, 30)
    if not raw.exists():
        return {"error": (proc.stderr.read() or b"").decode()[-300:]}
    return throughput.summarize_pyspy(raw)


def _profile_abandon(recorder: Any) -> None:
    """Kill a py-spy still recording (the scenario failed before it was stopped)."""
    if recorder is not None and recorder[0].poll() is None:
        recorder[0].kill()
        recorder[0].wait()


# --------------------------------------------------------------------- 2. fleet


async def fleet(pg: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Scripted worker streams running short jobs, watchers following them, for a while."""
    import asyncpg
    import grpc

    from control.db import libpq_url
    from spool.v1 import job_pb2
    from spool.v1 import job_service_pb2 as pb
    from spool.v1 import job_service_pb2_grpc as pbg

    spool = S.SpoolSystem(pg, tmp, "0x1", [])
    await spool.start(DB_OF["fleet"])
    pid = spool.cp.pid
    errors: Counter[str] = Counter()
    workers = [ScriptedWorker(spool.address, f"fleet-{i}") for i in range(args.fleet_workers)]
    channels = _channels(spool.address, args.fleet_watchers)
    stop = asyncio.Event()
    submitted: list[str] = []
    recent: deque[tuple[float, str]] = deque()
    counts = Counter()
    rss_samples: list[float] = []
    recorder = None
    try:
        idle = proc_status_mb(pid)
        for w in workers:
            w.start()
        await asyncio.wait_for(asyncio.gather(*(w.welcomed.wait() for w in workers)), 120)
        log(f"fleet: {len(workers)} worker streams welcomed")
        spec = job_pb2.JobSpec(type="debug.sleep")
        steps = max(1, round(args.fleet_job_s / args.fleet_progress_s))
        spec.params.update({"duration": args.fleet_job_s, "steps": steps})

        async def submitter() -> None:
            owed, tick = 0.0, time.monotonic()
            while not stop.is_set():
                owed += args.fleet_rate * FLEET_SUBMIT_TICK_S
                size, owed = int(owed), owed - int(owed)
                if size:
                    req = pb.SubmitBatchRequest(jobs=[spec] * size)
                    try:
                        jobs = (await spool.stub.SubmitBatch(req, timeout=30)).jobs
                    except grpc.aio.AioRpcError as exc:
                        errors[f"SubmitBatch failed: {exc.code().name}"] += 1
                    else:
                        now = time.monotonic()
                        for j in jobs:
                            submitted.append(j.id)
                            recent.append((now, j.id))
                tick += FLEET_SUBMIT_TICK_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, tick - time.monotonic()))

        async def watcher(i: int) -> None:
            stub = pbg.JobServiceStub(channels[i // WATCHERS_PER_CHANNEL])
            while not stop.is_set():
                while recent and recent[0][0] < time.monotonic() - FLEET_PICK_WINDOW_S:
                    recent.popleft()
                if not recent:
                    await asyncio.sleep(0.1)
                    continue
                job_id = random.choice(recent)[1]
                state = None
                try:
                    req = pb.WatchProgressRequest(job_id=job_id)
                    async for resp in stub.WatchProgress(req, timeout=args.fleet_job_s + 120):
                        counts["events"] += 1
                        if resp.event.kind == job_pb2.JOB_EVENT_KIND_STATE:
                            state = resp.event.state
                except grpc.aio.AioRpcError as exc:
                    errors[f"watch stream failed: {exc.code().name}"] += 1
                    continue
                counts["watches"] += 1
                if state != job_pb2.JOB_STATE_SUCCEEDED:
                    errors["watch did not end with SUCCEEDED"] += 1

        async def sample_rss() -> None:
            while True:
                rss_samples.append(proc_status_mb(pid)["VmRSS"])
                await asyncio.sleep(0.5)

        roots = _cpu_roots(pid, pg)
        recorder = await _profile_start(args.profile, "fleet", pid)
        cpu0 = S.cpu_seconds(roots)
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(submitter())]
        tasks += [asyncio.create_task(watcher(i)) for i in range(args.fleet_watchers)]
        sampler = asyncio.create_task(sample_rss())
        await asyncio.sleep(args.fleet_seconds)
        stop.set()
        log(f"fleet: {len(submitted)} jobs submitted in {args.fleet_seconds:.0f} s; draining")
        # Every job submitted runs to its end; the watchers end with their jobs.
        conn = await asyncpg.connect(libpq_url(spool.pg.url(f"spool_bench_r{DB_OF['fleet']}")))
        try:
            deadline = time.monotonic() + args.fleet_job_s * 3 + 120
            while await conn.fetchval(NOT_DONE_SQL):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(S.POLL_S)
            elapsed = time.perf_counter() - t0
            states = dict(await conn.fetch(STATES_OF_SQL, submitted))
            waits = [r[0] for r in await conn.fetch(QUEUE_WAIT_SQL, submitted)]
        finally:
            await conn.close()
        await asyncio.wait_for(asyncio.gather(*tasks), args.fleet_job_s + 120)
        sampler.cancel()
        rss = proc_status_mb(pid)
        cpu1 = S.cpu_seconds(roots)
        profile = await _profile_stop(recorder)
    finally:
        _profile_abandon(recorder)
        stop.set()
        await asyncio.gather(*(w.close() for w in workers))
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
        await spool.stop()

    done = states.get("succeeded", 0)
    if done < len(submitted):
        errors["jobs not SUCCEEDED at the end"] += len(submitted) - done
    for w in workers:
        errors.update(w.problems)
    return {
        "workers": len(workers),
        "watchers": args.fleet_watchers,
        "seconds": args.fleet_seconds,
        "elapsed": elapsed,
        "submitted": len(submitted),
        "done": done,
        "states": states,
        "assigned": sum(w.assigned for w in workers),
        "watches": counts["watches"],
        "events": counts["events"],
        "idle": idle,
        "rss": rss,
        "rss_sampled_max": max(rss_samples, default=float("nan")),
        "queue_wait": summary(waits),
        "profile": profile,
        "cpu": {k: (cpu1[k] - cpu0[k]) / elapsed for k in cpu0},
        "errors": dict(errors),
    }


#: ms from submit to the claim that started the job
QUEUE_WAIT_SQL = (
    "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000 FROM jobs"
    " WHERE id = ANY($1::uuid[]) AND started_at IS NOT NULL"
)


# ------------------------------------------------------------------------ run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from control.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="spool-scale-"))
    pg = EmbeddedPostgres(tmp / "pg", delete_on_stop=True)
    await asyncio.to_thread(pg.start)
    result: dict[str, Any] = {"failed": {}}
    try:
        for name in args.scenarios:
            log(f"scenario {name}")
            t0 = time.perf_counter()
            try:
                result[name] = await {"fanout": fanout, "fleet": fleet, "table": table}[name](
                    pg, tmp, args
                )
            except Exception as exc:
                log(f"{name} failed: {exc!r}")
                result["failed"][name] = f"{type(exc).__name__}: {exc}"
            log(f"scenario {name}: {time.perf_counter() - t0:.0f} s")
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# --------------------------------------------------------------------- report


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def _errors(errs: dict[str, int]) -> str:
    total = sum(errs.values())
    if not total:
        return "0"
    return f"{total} (" + "; ".join(f"{k}: {v}" for k, v in sorted(errs.items())) + ")"


def _connections(streams: int) -> str:
    n = -(-streams // WATCHERS_PER_CHANNEL)
    return f"{n} connection{'' if n == 1 else 's'}"


def render(result: dict, args: argparse.Namespace, argv: list[str], seconds: float) -> str:
    """The markdown section: one table of figures against targets, then the details."""
    from bench.throughput import _version

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"## Scale: progress fan-out, a fleet on one control process, a big jobs table ({when})",
        "",
        f"`python -m bench.scale{' ' + ' '.join(argv) if argv else ''}` — {seconds:.0f} s on"
        f" {platform.node()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
        f" at the end), Python {platform.python_version()}, grpcio {_version('grpcio')}; one"
        " embedded Postgres (pgserver), a fresh `python -m control.main` (defaults, auth off)"
        " and database per scenario; the clients run in the bench process, on the same cores.",
        "",
        "| scenario | figure | target | met |",
        "|---|---|---|---|",
    ]
    rows = _rows(result)
    for label, figure, target, ok in rows:
        lines.append(f"| {label} | {figure} | {target} | {_met(ok)} |")
    lines.append("")
    if "fanout" in result:
        lines += _fanout_details(result["fanout"], args)
    if "fleet" in result:
        lines += _fleet_details(result["fleet"], args)
    if "table" in result:
        lines += _table_details(result["table"])
    lines.append(
        "- cancel reaching running code: measured by `python -m bench.dispatch` (Cancel RPC →"
        " the handler in a real `spool-worker` sees `ctx.cancelled`), not repeated here"
    )
    for name, why in result["failed"].items():
        lines.append(f"- **{name} failed**: {why}")
    return "\n".join(lines) + "\n"


def _rows(result: dict) -> list[tuple[str, str, str, bool | None]]:
    """(label, figure, target, met) of every figure that has a target."""
    rows: list[tuple[str, str, str, bool | None]] = []
    f = result.get("fanout")
    if f:
        p = f["pairs"]
        rows.append((
            f"progress fan-out to {f['watchers']:,} watchers: delay p50 / p99 ms"
            " (update_time → watcher received)",
            f"{p['p50']:.1f} / {p['p99']:.1f}", f"p99 ≤ {TARGET_FANOUT_P99_MS:.0f} ms",
            p["p99"] <= TARGET_FANOUT_P99_MS,
        ))  # fmt: skip
        rows.append(("progress fan-out: errors", _errors(f["errors"]), "0", not f["errors"]))
    fl = result.get("fleet")
    if fl:
        who = f"{fl['workers']:,} workers + {fl['watchers']:,} watchers"
        hwm = fl["rss"]["VmHWM"]
        rows += [
            (f"{who}, {fl['seconds']:.0f} s: control process peak RSS (VmHWM)",
             f"{hwm:.0f} MB", f"< {TARGET_RSS_MB:.0f} MB", hwm < TARGET_RSS_MB),
            (f"{who}: errors", _errors(fl["errors"]), "0", not fl["errors"]),
            (f"{who}: jobs done", f"{fl['done']:,} of {fl['submitted']:,}", "all",
             fl["done"] == fl["submitted"]),
        ]  # fmt: skip
    t = result.get("table")
    if t:
        e, b = t["empty"], t["big"]
        n = f"{t['fill']['jobs']:,}-row"
        for key, label in (("get", "Get p99 ms"), ("list", "List first page p99 ms")):
            ratio = b[key]["p99"] / e[key]["p99"]
            rows.append((
                f"{n} table: {label}, empty → big",
                f"{e[key]['p99']:.1f} → {b[key]['p99']:.1f} ({ratio:.2f}x)",
                f"≤ {TARGET_TABLE_RATIO:.0f}x empty", ratio <= TARGET_TABLE_RATIO,
            ))  # fmt: skip
        de, db = e["dispatch"]["jobs_per_s"], b["dispatch"]["jobs_per_s"]
        rows.append((
            f"{n} table: dispatch jobs/s ({b['dispatch']['n']:,} no-op, SubmitBatch), empty → big",
            f"{de:,.0f} → {db:,.0f} ({db / de:.2f}x)", "—", None,
        ))  # fmt: skip
        rows.append((f"{n} table: errors", _errors(t["errors"]), "0", not t["errors"]))
    rows.append(
        ("cancel reaching running code p99", "bench.dispatch (its cancel row)", "≤ 50 ms", None)
    )
    return rows


def _fanout_details(f: dict, args: argparse.Namespace) -> list[str]:
    first, last, p, cpu = f["first"], f["last"], f["pairs"], f["cpu_ms"]
    lines = [
        f"- fan-out: one `debug.sleep` job, {f['reported']} progress reports"
        f" {args.interval * 1000:.0f} ms apart ({f['progress_events']} stored), a real"
        f" `spool-worker` x 1 slot; {f['watchers']:,} WatchProgress streams over"
        f" {_connections(f['watchers'])}, all open ({f['connect_s']:.1f} s to open) before"
        f" the job started; {p['n']:,} (event, watcher) pairs, max {p['max']:.1f} ms. Per"
        f" event: first watcher p50 {first['p50']:.1f} / p99 {first['p99']:.1f} ms (the"
        f" pipeline), last watcher p50 {last['p50']:.1f} / p99 {last['p99']:.1f} ms (plus the"
        f" fan-out). CPU per progress event: control {cpu['control']:.1f} ms, bench"
        f" clients {cpu['bench']:.1f} ms, Postgres {cpu['postgres']:.1f} ms; control peak"
        f" RSS {f['rss']['VmHWM']:.0f} MB",
    ]
    c = f.get("ceiling")
    if c:
        d = c["delay"]
        lines.append(
            f"- fan-out ceiling of the transport, same run (`bench/fanout_ceiling.py`): a bare"
            f" grpc.aio server (uvloop, raw bytes, no protobuf, interceptors or database)"
            f" streaming {c['events']} events to the same {c['watchers']:,} watchers read the"
            f" same way: delay p50 {d['p50']:.1f} / p99 {d['p99']:.1f} ms; CPU per message:"
            f" server {c['server_us']:.0f} µs (Spool's control plane"
            f" {f['cpu_ms']['control'] * 1000 / f['watchers']:.0f} µs), bench clients"
            f" {c['client_us']:.0f} µs"
        )
    return lines + _profile_lines(f.get("profile"))


def _profile_lines(prof: dict[str, Any] | None) -> list[str]:
    """A py-spy summary (bench.throughput.summarize_pyspy) as sub-bullets."""
    if not prof:
        return []
    if "error" in prof:
        return [f"  - py-spy: {prof['error']}"]
    return [
        f"  - py-spy on the control process ({prof['samples']} samples holding the GIL),"
        " self time by package: "
        + ", ".join(f"{name} {share:.0f} %" for name, share in prof["packages"][:8]),
        "  - self time, top 8: "
        + "; ".join(f"`{fn}` {share:.1f} %" for fn, share in prof["self"][:8]),
        "  - inclusive, Spool's own functions: "
        + "; ".join(f"`{fn}` {share:.1f} %" for fn, share in prof["inclusive"][:8]),
    ]


def _fleet_details(fl: dict, args: argparse.Namespace) -> list[str]:
    cpu, wait = fl["cpu"], fl["queue_wait"]
    return [
        f"- fleet: {fl['workers']:,} scripted worker streams (bench/scripted.py: the real"
        " WorkerService protocol, one TCP connection each, in the bench process — 200"
        " worker processes would not fit on 2 cores beside the control plane), 1 slot"
        f" each; `debug.sleep` jobs of {args.fleet_job_s:g} s reporting progress every"
        f" {args.fleet_progress_s:g} s, {args.fleet_rate:g} jobs/s submitted for"
        f" {fl['seconds']:.0f} s, then drained ({fl['elapsed']:.0f} s in all);"
        f" {fl['watchers']:,} watchers over {_connections(fl['watchers'])} followed"
        f" {fl['watches']:,} jobs to their end ({fl['events']:,} events). Submit → start"
        f" (queue wait) p50 {wait['p50']:,.0f} / p99 {wait['p99']:,.0f} ms. Control RSS"
        f" {fl['idle']['VmRSS']:.0f} MB idle, {fl['rss_sampled_max']:.0f} MB highest"
        f" sampled, {fl['rss']['VmRSS']:.0f} MB at the end; CPU: control"
        f" {cpu['control'] * 100:.0f} %, bench clients {cpu['bench'] * 100:.0f} %, Postgres"
        f" {cpu['postgres'] * 100:.0f} % of a core",
        *_profile_lines(fl.get("profile")),
    ]


def _table_details(t: dict) -> list[str]:
    fi, e, b = t["fill"], t["empty"], t["big"]
    ed, bd = e["dispatch"], b["dispatch"]
    return [
        f"- table: {t['rows']:,} terminal jobs (96 % succeeded, 2 % failed, 2 % canceled;"
        " finish times over 6 days, inside the retention) with 3 STATE events each,"
        f" written by INSERT ... SELECT generate_series in {fi['insert_s']:.0f} s"
        + (" (job_events' foreign-key trigger skipped)" if fi["fk_trigger_skipped"] else "")
        + f", VACUUM ANALYZE {fi['vacuum_s']:.0f} s: jobs {fi['jobs_mb']:,.0f} MB,"
        f" job_events {fi['events_mb']:,.0f} MB with indexes. Empty: a second database and"
        f" control process holding {e['jobs'][0]:,} jobs (warm-ups; {e['jobs'][1]:,} by the"
        f" end). {e['get']['n']} sequential calls of each kind per table in {t['reps']}"
        " rounds, the two tables taking turns call by call (Get of random jobs)."
        f" p50 empty → big: Get {e['get']['p50']:.1f}"
        f" → {b['get']['p50']:.1f} ms, List {e['list']['p50']:.1f} → {b['list']['p50']:.1f} ms",
        f"  - for information ({b['stats']['n']} calls): List first page of FAILED jobs p99"
        f" {e['list_failed']['p99']:.1f} → {b['list_failed']['p99']:.1f} ms; GetStats p99"
        f" {e['stats']['p99']:.1f} → {b['stats']['p99']:.1f} ms (terminal jobs from the"
        " counts the jobs triggers keep, not a count of the table)",
        f"  - dispatch: one `spool-worker` x 8 slots, `debug.noop`, batches of 500, first"
        f" submit → all done (SQL on the partial indexes, every {S.POLL_S * 1000:.0f} ms),"
        f" median of {t['reps']} rounds (range): empty {ed['jobs_per_s']:,.0f}"
        f" ({ed['min']:,.0f}-{ed['max']:,.0f}), big {bd['jobs_per_s']:,.0f}"
        f" ({bd['min']:,.0f}-{bd['max']:,.0f}) jobs/s",
    ]


#: option -> (full run, --quick)
DEFAULTS: dict[str, tuple[float, float]] = {
    "watchers": (1000, 100),
    "events": (40, 20),
    "fleet_workers": (200, 20),
    "fleet_watchers": (1000, 100),
    "fleet_seconds": (25.0, 10.0),
    "fleet_rate": (20.0, 4.0),
    "fleet_job_s": (5.0, 3.0),
    "rows": (1_000_000, 50_000),
    "samples": (500, 300),
    "dispatch_jobs": (2000, 500),
    "table_reps": (3, 2),
}


def main(argv: list[str] | None = None) -> int:
    """Measure, print the section, append it to bench/report.md."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--quick", action="store_true", help="100 watchers; 20 workers + 100 watchers; 50,000 rows")
    a("--scenarios", default=",".join(SCENARIOS), help="comma list of fanout,fleet,table")
    a("--watchers", type=int, help="fan-out watchers (default 1,000; --quick 100)")
    a("--events", type=int, help="fan-out progress reports (default 40; --quick 20)")
    a("--interval", type=float, default=0.25, help="seconds between fan-out progress reports")
    a("--fleet-workers", type=int, help="scripted worker streams (default 200; --quick 20)")
    a("--fleet-watchers", type=int, help="fleet watchers (default 1,000; --quick 100)")
    a("--fleet-seconds", type=float, help="fleet submitting time (default 25; --quick 10)")
    a("--fleet-rate", type=float, help="fleet jobs/s submitted (default 20; --quick 4)")
    a("--fleet-job-s", type=float, help="seconds a fleet job runs (default 5; --quick 3)")
    a("--fleet-progress-s", type=float, default=0.5, help="fleet progress report interval")
    a("--rows", type=int, help="rows of the big table (default 1,000,000; --quick 50,000)")
    a("--samples", type=int, help="Get and List calls per table (default 500; --quick 300)")
    a("--info-samples", type=int, default=10, help="List FAILED and GetStats calls per table")
    a("--dispatch-jobs", type=int, help="no-op jobs per round (default 2,000; --quick 500)")
    a("--table-reps", type=int, help="rounds per table, alternating (default 3; --quick 2)")
    a("--profile", metavar="DIR", help="py-spy the control process in fan-out and fleet")
    a("--no-report", action="store_true", help="do not append to bench/report.md")
    args = p.parse_args(argv)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = set(args.scenarios) - set(SCENARIOS)
    if bad:
        p.error(f"unknown scenarios: {', '.join(sorted(bad))}")
    t0 = time.perf_counter()
    result = asyncio.run(run(args))
    section = render(result, args, argv, time.perf_counter() - t0)
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
