"""One chaos run end to end: start the cluster, drive traffic and faults, settle, check.

    report = await run_chaos(ChaosConfig(jobs=300, duration_s=40, seed=1))
    print(format_report(report))

Everything the run starts (processes, proxies, Postgres, the temp dir) is torn
down in `finally`, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chaos import faults
from bench.chaos.checks import Checker, Evidence, read_marks
from bench.chaos.cluster import CLIENT_KEY, LEASE_S, Cluster, ClusterSpec
from bench.chaos.traffic import (
    Api,
    CallLog,
    Clock,
    Observer,
    Submitter,
    Watchers,
    new_tenant,
    plan_workload,
)

log = logging.getLogger("spool.chaos")

#: after the chaos window, how long every job gets to become terminal
SETTLE_S = 90.0
#: after that, how long open watchers get to see their stream end
WATCH_END_S = 8.0
#: log lines quoted per violation example
LOG_LINES = 14
#: the start of a log line (control: ISO time; worker: "2026-01-01 10:00:00,123")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


@dataclass
class ChaosConfig:
    """What to run. The defaults are the full run of `make chaos`."""

    jobs: int = 2000
    workers: int = 4
    replicas: int = 2
    slots: int = 2
    duration_s: float = 180.0
    seed: int = 1
    #: fraction of jobs with a live WatchProgress watcher
    watch_fraction: float = 0.15
    #: empty: an embedded Postgres the run can restart; else that URL (no restarts)
    database_url: str = ""
    max_faults: int = 200
    #: keep the run dir (logs, markers) instead of deleting it
    keep_dir: bool = False


async def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run once; the report (see format_report) with `violations.total`."""
    wall = time.monotonic()
    rng = random.Random(cfg.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="spool-chaos-"))
    tenant = new_tenant(cfg.seed)
    cluster = Cluster(ClusterSpec(cfg.replicas, cfg.workers, cfg.slots, cfg.database_url), run_dir)
    api: Api | None = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        await cluster.start(tenant)
        clock = Clock()
        calls = CallLog(clock)
        api = Api(cluster.addresses, CLIENT_KEY, calls)
        watchers = Watchers(api, clock)
        groups = plan_workload(rng, cfg.jobs, cfg.duration_s, cfg.watch_fraction)
        submitter = Submitter(api, clock, groups, watchers)
        observer = Observer(api, clock, random.Random(cfg.seed + 1), interval_s=1.5)
        plan = faults.plan_faults(
            rng,
            cfg.duration_s,
            workers=cfg.workers,
            replicas=cfg.replicas,
            pg_restarts=cluster.postgres.restartable,
            max_faults=cfg.max_faults,
        )
        injector = faults.Injector(
            cluster, watchers, clock, random.Random(cfg.seed + 2), plan, cfg.duration_s
        )
        stop_observer = asyncio.Event()
        tasks = [
            asyncio.create_task(submitter.run(), name="submitter"),
            asyncio.create_task(injector.run(), name="injector"),
            asyncio.create_task(observer.run(stop_observer), name="observer"),
        ]
        await asyncio.gather(tasks[0], tasks[1])
        chaos_end = clock.now()
        settled = await _settle(cluster, tenant)
        settle_s = clock.now() - chaos_end
        await watchers.finish(WATCH_END_S)
        stop_observer.set()
        await tasks[2]
        await observer.round()
        jobs, events = await _read_db(cluster, tenant)
        evidence = Evidence(
            t0=clock.t0,
            jobs=jobs,
            events=events,
            planned=submitter.jobs,
            watches=list(watchers.watches.values()),
            observer=observer,
            calls=calls,
            dedupe=submitter.dedupe,
            marks=read_marks(cluster.marks_dir, clock.t0),
            worker_faults=injector.worker_faults,
        )
        checker = Checker(evidence)
        checker.run()
        for failure in injector.failed:
            checker.add("fault_failed", what=failure)
        for error in watchers.errors:
            checker.add("harness_error", what=error)
        if not settled:
            checker.info["not settled within the settle time"] = 1
        _attach_logs(checker.violations, cluster.logs_dir, clock.t0)
        _attach_faults(checker.violations, injector.done)
        notes = (
            []
            if cluster.postgres.restartable
            else [
                "postgres restarts skipped: external database (TEST_DATABASE_URL / --database-url)"
            ]
        )
        return {
            "config": asdict(cfg) | {"database_url": "external" if cfg.database_url else ""},
            "tenant": tenant,
            "lease_s": LEASE_S,
            "wall_s": round(time.monotonic() - wall, 1),
            "chaos_s": round(chaos_end, 1),
            "settle_s": round(settle_s, 1),
            "settled": settled,
            "faults": {
                "by_kind": dict(sorted(injector.counts().items())),
                "total": len(injector.done),
                "list": [
                    asdict(f) | {"start": round(f.start, 2), "end": round(f.end, 2)}
                    for f in injector.done
                ],
                "skipped": injector.skipped,
                "notes": notes,
            },
            "jobs": {
                "checked": len(jobs),
                "planned": len(submitter.jobs),
                "by_state": dict(sorted(Counter(j["state"] for j in jobs).items())),
                "submits_unanswered": submitter.unanswered,
                "cancels": submitter.cancels,
                "dedupe_checks": len(submitter.dedupe),
                "attempts": dict(sorted(Counter(j["attempt"] for j in jobs).items())),
            },
            "watchers": {
                "checked": len(watchers.watches),
                "resumes": sum(w.resumes for w in watchers.watches.values()),
                "cuts": sum(w.cuts for w in watchers.watches.values()),
            },
            "observer": {"rounds": observer.rounds, "observations": observer.observations},
            "calls": {
                "total": sum(calls.counts.values()),
                "by_code": dict(sorted(_by_code(calls.counts).items())),
                "by_method_code": {f"{m} {c}": n for (m, c), n in sorted(calls.counts.items())},
            },
            "info": dict(sorted(checker.info.items())),
            "violations": {
                "total": sum(len(v) for v in checker.violations.values()),
                "by_kind": {k: len(v) for k, v in sorted(checker.violations.items())},
                "by_near_fault": {
                    k: dict(Counter(_near(ex) for ex in v).most_common())
                    for k, v in sorted(checker.violations.items())
                },
                "examples": {k: v[:5] for k, v in sorted(checker.violations.items())},
            },
            "run_dir": str(run_dir) if cfg.keep_dir else "",
        }
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        await cluster.close()
        if not cfg.keep_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _by_code(counts: Counter[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_, code), n in counts.items():
        out[code] += n
    return out


async def _settle(cluster: Cluster, tenant: str) -> bool:
    """Wait until every job of the tenant is terminal (False after SETTLE_S)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            rows = await cluster.query(
                "SELECT count(*) AS n FROM jobs WHERE tenant = $1"
                " AND state NOT IN ('succeeded', 'failed', 'canceled')",
                tenant,
            )
            if rows[0]["n"] == 0:
                return True
        await asyncio.sleep(0.5)
    return False


async def _read_db(cluster: Cluster, tenant: str) -> tuple[list[Any], list[Any]]:
    jobs = await cluster.query(
        "SELECT id::text AS id, state, attempt, max_attempts, result, error, worker_id,"
        " last_seq, request_id, labels->>'chaos_n' AS n FROM jobs WHERE tenant = $1",
        tenant,
    )
    events = await cluster.query(
        "SELECT e.job_id::text AS job_id, e.seq, e.kind, e.state, e.attempt, e.worker_id,"
        " e.error, e.progress, e.message, extract(epoch FROM e.created_at)::float8 AS t"
        " FROM job_events AS e JOIN jobs AS j ON j.id = e.job_id"
        " WHERE j.tenant = $1 ORDER BY e.job_id, e.seq",
        tenant,
    )
    return [dict(r) for r in jobs], [dict(r) for r in events]


def _attach_logs(violations: dict[str, list[dict[str, Any]]], logs_dir: Path, t0: float) -> None:
    """Quote the log lines behind the first examples of each kind: the lines naming the
    job; for a bad status the server's lines of that request id (with the exception its
    traceback ended in); for a lost result also what the replicas said about that worker
    meanwhile (warnings, errors, disconnects)."""
    texts = {p.name: p.read_text(errors="replace").splitlines() for p in logs_dir.glob("*.log")}
    for examples in violations.values():
        for ex in examples[:2]:
            key = ex.get("request_id") or ex.get("job")
            if not isinstance(key, str) or len(key) < 8:
                continue
            # A request id must match whole (chaos-71 is not chaos-710).
            pattern = re.compile(re.escape(key) + (r"(?!\d)" if ex.get("request_id") else ""))
            quoted: list[str] = []
            for name, lines in sorted(texts.items()):
                for i, line in enumerate(lines):
                    if pattern.search(line):
                        quoted.append(f"{name}: {line}")
                        if ex.get("request_id"):
                            quoted += [f"{name}: {x}" for x in _exception_lines(lines, i + 1)]
            if "instance" in ex and "ended_at" in ex:
                worker = f"worker {ex['instance'].partition('#')[0]}"
                since, until = t0 + ex["handler_finished_at"] - 0.5, t0 + ex["ended_at"] + 0.5
                quoted += [
                    f"{name}: {line}"
                    for name, lines in sorted(texts.items())
                    if name.startswith("replica")
                    for line in lines
                    if worker in line
                    and " info spool.rpc " not in line
                    and since <= _control_log_time(line) <= until
                ]
            ex["log"] = quoted[:LOG_LINES]


def _control_log_time(line: str) -> float:
    """The epoch time of a control-plane text log line (0.0 when it has none)."""
    try:
        when = datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return 0.0
    return when.replace(tzinfo=UTC).timestamp()


def _attach_faults(
    violations: dict[str, list[dict[str, Any]]], done: list[faults.Injected]
) -> None:
    """Name the faults around each example's moment (from a second before a fault began
    to a lease after it ended): what the violation most likely followed."""
    for examples in violations.values():
        for ex in examples:
            t = ex.get("t", ex.get("handler_finished_at", ex.get("at")))
            if not isinstance(t, int | float):
                continue
            around = [f for f in done if f.start - 1.0 <= t <= f.end + LEASE_S]
            # The fault in progress first, then the most recently ended.
            around.sort(key=lambda f: 0.0 if t <= f.end else t - f.end)
            near = [f"{f.kind} {f.target} {f.start:.1f}-{f.end:.1f}s" for f in around]
            if near:
                ex["near_faults"] = near


def _near(example: dict[str, Any]) -> str:
    """The kind of the first fault near an example ("none" if there was none)."""
    near = example.get("near_faults") or ["none"]
    return near[0].split(" ", 1)[0]


def _exception_lines(lines: list[str], start: int) -> list[str]:
    """The exception lines (`pkg.Error: message`) of the traceback starting at `start`."""
    found = []
    for line in lines[start : start + 300]:
        if _LOG_LINE.match(line):
            break
        if line[:1].isalpha() and not line.startswith(("Traceback", "The above", "During")):
            found.append(line)
    return found[-2:]


def format_report(r: dict[str, Any]) -> str:
    """The human summary: faults by kind, jobs checked, violations by kind with examples."""
    c = r["config"]
    lines = [
        f"chaos run: seed {c['seed']}, {c['jobs']} jobs, {c['workers']} workers x {c['slots']}"
        f" slots, {c['replicas']} replicas, {c['duration_s']:g}s of faults"
        f" (lease {r['lease_s']:g}s)"
        f"; wall {r['wall_s']}s, settled {'yes' if r['settled'] else 'NO'} in {r['settle_s']}s",
        f"faults injected: {r['faults']['total']} "
        + " ".join(f"{k}={v}" for k, v in r["faults"]["by_kind"].items()),
    ]
    lines += [f"  note: {n}" for n in r["faults"]["notes"]]
    lines += [f"  skipped: {s}" for s in r["faults"]["skipped"]]
    j = r["jobs"]
    lines.append(
        f"jobs checked: {j['checked']} ({' '.join(f'{k}={v}' for k, v in j['by_state'].items())})"
        f"; planned {j['planned']}, submits unanswered {j['submits_unanswered']},"
        f" cancels {j['cancels']}, dedupe checks {j['dedupe_checks']}"
    )
    w = r["watchers"]
    lines.append(f"watchers checked: {w['checked']} (resumes {w['resumes']}, cuts {w['cuts']})")
    lines.append(
        f"client calls: {r['calls']['total']} ("
        + " ".join(f"{k}={v}" for k, v in r["calls"]["by_code"].items())
        + f"); observer rounds {r['observer']['rounds']}"
    )
    for k, v in r["info"].items():
        lines.append(f"  {k}: {v}")
    v = r["violations"]
    lines.append(f"violations: {v['total']}")
    for kind, count in v["by_kind"].items():
        near = ", ".join(f"{k} {n}" for k, n in v["by_near_fault"][kind].items())
        lines.append(f"  {kind}: {count} (near faults: {near})")
        for ex in v["examples"][kind][:3]:
            quoted = ex.pop("log", [])
            lines.append(f"    e.g. {ex}")
            lines += [f"      | {line[:220]}" for line in quoted]
            if quoted:
                ex["log"] = quoted
    if r.get("run_dir"):
        lines.append(f"run dir kept: {r['run_dir']}")
    return "\n".join(lines)
