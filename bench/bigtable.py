"""bench.scale, scenario 3: Get, List and dispatch on an empty and on a big jobs table.

Two control processes, each with its own database and one `spool-worker` x 8
slots: one database stays (nearly) empty, the other gets `--rows` terminal
jobs written by SQL. Both first run 100 no-op jobs, so a first List page is
full on both; then rounds of sequential calls, the two tables taking turns
call by call (so a load spike of the shared machine hits both alike): Get of
random jobs, List first page, and for information List of FAILED jobs and
GetStats; then `--dispatch-jobs` no-op jobs by SubmitBatch on each (the order
flipping every round). Done is seen by SQL on the two partial indexes (queued,
running), cheap at any table size (and so is GetStats, since migration 0003).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import systems as S
from bench.throughput import log, pct

#: database suffixes of SpoolSystem.start (spool_bench_r<N>)
DB_EMPTY, DB_BIG = 903, 904
#: no-op jobs run on both tables before measuring (warm slots; a full first List page)
WARMUP_JOBS = 100
#: the filler rows' finish times span this much (inside the default 7-day retention)
FILL_SPAN = timedelta(days=6)
FILL_CHUNK = 100_000

#: jobs not yet terminal (two partial indexes: cheap however big the table)
NOT_DONE_SQL = (
    "SELECT (SELECT count(*) FROM jobs WHERE state = 'queued')"
    " + (SELECT count(*) FROM jobs WHERE state = 'running')"
)
STATES_OF_SQL = "SELECT state, count(*) FROM jobs WHERE id = ANY($1::uuid[]) GROUP BY state"
RANDOM_IDS_SQL = "SELECT id::text FROM jobs ORDER BY random() LIMIT $1"

# Terminal jobs (2 % failed, 2 % canceled) with their three STATE events, as the
# control plane writes them (control/store/jobs.py, control/store/dispatch.py);
# ids from md5, so the statement needs nothing read back. The caller sets
# session_replication_role = replica where it may: the per-row foreign-key
# trigger of job_events is skipped (a bulk load whose rows are consistent).
FILL_SQL = """
WITH g AS (
    SELECT md5('bench-fill-' || i)::uuid AS id,
           CASE WHEN i % 10 = 0 THEN 'debug.sleep' ELSE 'debug.noop' END AS type,
           CASE i % 50 WHEN 0 THEN 'failed' WHEN 1 THEN 'canceled' ELSE 'succeeded' END AS state,
           $3::timestamptz - ($2::bigint - i) * $4::interval AS c
    FROM generate_series($1::bigint, $2::bigint) AS i
),
ins AS (
    INSERT INTO jobs (id, tenant, type, params, priority, max_attempts, attempt, state,
                      result, error, worker_id, not_before, created_at, started_at,
                      finished_at, updated_at, last_seq)
    SELECT id, $5::text, type, '{}'::jsonb, 0, 3, 1, state,
           CASE WHEN state = 'succeeded' THEN '{}'::jsonb END,
           CASE WHEN state <> 'succeeded' THEN jsonb_build_object(
               'code', CASE state WHEN 'failed' THEN 'HANDLER_ERROR' ELSE 'CANCELED' END,
               'message', 'bench filler', 'retryable', false) END,
           'bench-filler', c, c, c + interval '5 ms', c + interval '1 s', c + interval '1 s', 3
    FROM g
)
INSERT INTO job_events (job_id, seq, kind, state, attempt, error, worker_id, created_at)
SELECT g.id, s.seq, 'state',
       CASE s.seq WHEN 1 THEN 'queued' WHEN 2 THEN 'running' ELSE g.state END, 1,
       CASE WHEN s.seq = 3 AND g.state = 'failed' THEN jsonb_build_object(
           'code', 'HANDLER_ERROR', 'message', 'bench filler', 'retryable', false) END,
       CASE WHEN s.seq > 1 THEN 'bench-filler' END,
       g.c + (s.seq - 1) * interval '5 ms'
FROM g CROSS JOIN (VALUES (1), (2), (3)) AS s(seq)
"""


# What the jobs triggers would have appended for the filler (see `fill`).
COUNT_FILLER_SQL = """
INSERT INTO job_count_deltas (tenant, type, state, n)
SELECT tenant, type, state, count(*) FROM jobs
WHERE tenant = $1 AND worker_id = 'bench-filler' GROUP BY tenant, type, state
"""


def summary(ms: list[float]) -> dict[str, float]:
    """n, p50, p99 and max of latencies in ms (NaN when there are none)."""
    if not ms:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms)}


async def fill(conn: Any, rows: int, tenant: str = "default") -> dict[str, Any]:
    """Write `rows` terminal jobs of `tenant` (auth off: "default") and their events,
    then VACUUM ANALYZE; timings and sizes."""
    t0 = time.perf_counter()
    base = datetime.now(UTC) - timedelta(minutes=1)
    step = FILL_SPAN / max(rows, 1)
    replica = True
    for lo in range(1, rows + 1, FILL_CHUNK):
        hi = min(rows, lo + FILL_CHUNK - 1)
        async with conn.transaction():
            if replica:
                try:
                    async with conn.transaction():  # a savepoint: a refusal leaves the rest
                        await conn.execute("SET LOCAL session_replication_role = replica")
                except Exception:
                    replica = False
            await conn.execute(FILL_SQL, lo, hi, base, step, tenant)
        log(f"table: {hi:,} of {rows:,} rows written ({time.perf_counter() - t0:.0f} s)")
    if replica:
        # The replica role skipped the jobs triggers that count terminal jobs too
        # (control.schema.job_counts): count the filler here instead.
        await conn.execute(COUNT_FILLER_SQL, tenant)
    insert_s = time.perf_counter() - t0
    # As autovacuum would soon: visibility map and statistics current, and no
    # autovacuum of a million fresh rows running during the measurements.
    await conn.execute("VACUUM (ANALYZE) jobs")
    await conn.execute("VACUUM (ANALYZE) job_events")
    sizes = await conn.fetchrow(
        "SELECT pg_total_relation_size('jobs') AS jobs,"
        " pg_total_relation_size('job_events') AS events, (SELECT count(*) FROM jobs) AS n"
    )
    return {
        "insert_s": insert_s,
        "vacuum_s": time.perf_counter() - t0 - insert_s,
        "jobs_mb": sizes["jobs"] / 2**20,
        "events_mb": sizes["events"] / 2**20,
        "jobs": sizes["n"],
        "fk_trigger_skipped": replica,
    }


async def _paired(calls: dict[str, Any], samples: int, warmup: int = 5) -> dict[str, list[float]]:
    """ms of `samples` sequential calls on each table, the tables taking turns call by call
    (the order flipping every pair), so a load spike of the machine hits both alike."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(samples + warmup):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            await calls[name](i)
            if i >= warmup:
                out[name].append((time.perf_counter() - t0) * 1000)
    return out


async def dispatch_rate(spool: Any, conn: Any, n: int, batch: int = 500) -> dict[str, Any]:
    """`n` no-op jobs by SubmitBatch, first submit → all done (seen by SQL), and their states."""
    from spool.v1 import job_pb2
    from spool.v1 import job_service_pb2 as pb

    ids: list[str] = []
    t0 = time.perf_counter()
    for size in [batch] * (n // batch) + ([n % batch] if n % batch else []):
        req = pb.SubmitBatchRequest(jobs=[job_pb2.JobSpec(type="debug.noop")] * size)
        ids += [j.id for j in (await spool.stub.SubmitBatch(req, timeout=120)).jobs]

    async def none_left() -> bool:
        return not await conn.fetchval(NOT_DONE_SQL)

    procs = [spool.cp, *spool.workers]
    await S.poll_until(none_left, S.done_timeout_s(n), "no-op jobs", procs)
    seconds = time.perf_counter() - t0
    states = dict(await conn.fetch(STATES_OF_SQL, ids))
    return {"jobs_per_s": n / seconds, "seconds": seconds, "states": states, "n": n}


async def one_round(
    spools: dict[str, Any], conns: dict[str, Any], args: argparse.Namespace, rep: int
) -> dict[str, dict[str, Any]]:
    """Get / List / List FAILED / GetStats latencies, paired; then a dispatch run on each."""
    from spool.v1 import job_pb2
    from spool.v1 import job_service_pb2 as pb

    calls = -(-args.samples // args.table_reps)
    info = -(-args.info_samples // args.table_reps)
    failed = pb.ListRequest(page_size=50, states=[job_pb2.JOB_STATE_FAILED])
    get, listing, list_failed, stats = {}, {}, {}, {}
    for name, spool in spools.items():
        stub = spool.stub
        ids = [r["id"] for r in await conns[name].fetch(RANDOM_IDS_SQL, calls + 5)]
        get[name] = lambda i, stub=stub, ids=ids: stub.Get(
            pb.GetRequest(job_id=ids[i % len(ids)]), timeout=30
        )
        listing[name] = lambda i, stub=stub: stub.List(pb.ListRequest(), timeout=30)
        list_failed[name] = lambda i, stub=stub: stub.List(failed, timeout=60)
        stats[name] = lambda i, stub=stub: stub.GetStats(pb.GetStatsRequest(), timeout=60)
    figures = {
        "get": await _paired(get, calls),
        "list": await _paired(listing, calls),
        "list_failed": await _paired(list_failed, info, 1),
        "stats": await _paired(stats, info, 1),
    }
    out: dict[str, dict[str, Any]] = {n: {k: v[n] for k, v in figures.items()} for n in spools}
    for name in list(spools) if rep % 2 == 0 else list(spools)[::-1]:
        out[name]["dispatch"] = await dispatch_rate(spools[name], conns[name], args.dispatch_jobs)
    return out


async def table(pg: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The empty and the big table, measured in alternating rounds."""
    import asyncpg

    from control.db import libpq_url

    spools = {
        "empty": S.SpoolSystem(pg, tmp, "1x8", []),
        "big": S.SpoolSystem(pg, tmp, "1x8", []),
    }
    conns: dict[str, Any] = {}
    rounds: dict[str, list[dict[str, Any]]] = {"empty": [], "big": []}
    try:
        for name, db in (("empty", DB_EMPTY), ("big", DB_BIG)):
            await spools[name].start(db)
            conns[name] = await asyncpg.connect(libpq_url(pg.url(f"spool_bench_r{db}")))
            await dispatch_rate(spools[name], conns[name], WARMUP_JOBS)
        empty_jobs = await conns["empty"].fetchval("SELECT count(*) FROM jobs")
        log(f"table: writing {args.rows:,} rows")
        filled = await fill(conns["big"], args.rows)
        for rep in range(args.table_reps):
            log(f"table: round {rep + 1}/{args.table_reps}")
            for name, got in (await one_round(spools, conns, args, rep)).items():
                rounds[name].append(got)
        empty_jobs_end = await conns["empty"].fetchval("SELECT count(*) FROM jobs")
    finally:
        for conn in conns.values():
            await conn.close()
        for spool in spools.values():
            await spool.stop()

    errors: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for name, got in rounds.items():
        figures: dict[str, Any] = {
            k: summary([ms for r in got for ms in r[k]])
            for k in ("get", "list", "list_failed", "stats")
        }
        rates = [r["dispatch"]["jobs_per_s"] for r in got]
        figures["dispatch"] = {
            "jobs_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "seconds": statistics.median(r["dispatch"]["seconds"] for r in got),
            "n": args.dispatch_jobs,
        }
        for r in got:
            left = r["dispatch"]["n"] - r["dispatch"]["states"].get("succeeded", 0)
            if left:
                errors["no-op jobs not SUCCEEDED"] += left
        out[name] = figures
    out["empty"]["jobs"] = (empty_jobs, empty_jobs_end)
    out.update(fill=filled, rows=args.rows, reps=args.table_reps, errors=dict(errors))
    return out
