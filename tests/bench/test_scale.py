"""bench.scale: a tiny real run of every scenario, and the big table's rows as Spool reads them."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from bench import bigtable, scale
from control.db import libpq_url
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9][0-9,]*(\.[0-9]+)?"


def _table(out: str) -> dict[str, list[str]]:
    """The section's first table: label -> [figure, target, met]."""
    rows = {}
    for line in out.split("| scenario | figure |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_tiny_run_prints_every_scenario_without_errors() -> None:
    cmd = [sys.executable, "-m", "bench.scale", "--no-report", "--watchers", "10"]
    cmd += ["--events", "6", "--fleet-workers", "3", "--fleet-watchers", "10"]
    cmd += ["--fleet-seconds", "3", "--fleet-rate", "2", "--fleet-job-s", "1.5"]
    cmd += ["--rows", "2000", "--samples", "30", "--info-samples", "2", "--table-reps", "2"]
    cmd += ["--dispatch-jobs", "100"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "\n## Scale: progress fan-out, a fleet on one control process" in out
    rows = _table(out)

    fanout = next(v for k, v in rows.items() if k.startswith("progress fan-out to 10 watchers"))
    assert re.fullmatch(f"{NUMBER} / {NUMBER}", fanout[0]), fanout
    rss = rows["3 workers + 10 watchers, 3 s: control process peak RSS (VmHWM)"][0]
    assert re.fullmatch(f"{NUMBER} MB", rss) and 20 < float(rss.split()[0]) < 2000, rss
    done_jobs = rows["3 workers + 10 watchers: jobs done"][0]
    submitted = int(done_jobs.split(" of ")[1].replace(",", ""))
    assert submitted >= 4 and done_jobs == f"{submitted} of {submitted}", done_jobs
    errors = [label for label in rows if label.endswith("errors")]
    assert len(errors) == 3, errors
    for label in errors:
        assert rows[label][0] == "0", (label, rows[label])
    # The big table: 2,000 rows and the 100 warm-up jobs (+ 16 of the worker's warm-up).
    big = [label for label in rows if label.startswith("2,116-row table")]
    assert len(big) == 4, list(rows)
    for label in big[:3]:
        figure = rows[label][0]
        assert re.fullmatch(f"{NUMBER} → {NUMBER} \\({NUMBER}x\\)", figure), (label, figure)
    # The details say how the fleet was played and what the table held.
    assert "scripted worker streams (bench/scripted.py" in out
    assert "2,000 terminal jobs" in out and "3 STATE events each" in out
    assert "bench.dispatch" in out


async def test_filled_rows_read_like_the_control_planes_own(
    database_url: str, jobs: job_service_pb2_grpc.JobServiceStub
) -> None:
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        got = await bigtable.fill(conn, 300, tenant="acme")
        assert got["jobs"] == 300
        # seq is dense from 1 and last_seq names the newest event; no event without its job.
        bad = await conn.fetchval(
            "SELECT count(*) FROM jobs AS j WHERE j.last_seq <> (SELECT max(seq) FROM"
            " job_events AS e WHERE e.job_id = j.id) OR (SELECT count(*) FROM job_events AS e"
            " WHERE e.job_id = j.id) <> j.last_seq"
        )
        assert bad == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM job_events AS e WHERE NOT EXISTS"
                " (SELECT 1 FROM jobs AS j WHERE j.id = e.job_id)"
            )
            == 0
        )
    finally:
        await conn.close()
    totals = (await jobs.GetStats(job_service_pb2.GetStatsRequest())).totals
    assert (totals.succeeded, totals.failed, totals.canceled, totals.queued) == (288, 6, 6, 0)
    # Filler ids are md5('bench-fill-<i>'); every 50th job failed.
    failed_id = str(uuid.UUID(hashlib.md5(b"bench-fill-50").hexdigest()))
    job = (await jobs.Get(job_service_pb2.GetRequest(job_id=failed_id))).job
    assert job.state == job_pb2.JOB_STATE_FAILED and job.error.code == "HANDLER_ERROR"
    assert job.finish_time.ToSeconds() > job.start_time.ToSeconds() >= job.create_time.ToSeconds()
    events = [
        r.event
        async for r in jobs.WatchProgress(job_service_pb2.WatchProgressRequest(job_id=failed_id))
    ]
    assert [(e.seq, e.state) for e in events] == [
        (1, job_pb2.JOB_STATE_QUEUED),
        (2, job_pb2.JOB_STATE_RUNNING),
        (3, job_pb2.JOB_STATE_FAILED),
    ]
    page = await jobs.List(job_service_pb2.ListRequest(page_size=50))
    assert len(page.jobs) == 50 and page.next_page_token
    assert page.jobs[0].create_time.ToNanoseconds() >= page.jobs[-1].create_time.ToNanoseconds()


def test_percentiles_and_error_cells() -> None:
    got = bigtable.summary([float(x) for x in range(1, 101)])
    assert got["n"] == 100 and got["p50"] in (50.0, 51.0) and got["p99"] == 99.0
    assert got["max"] == 100.0
    assert scale._errors({}) == "0"
    assert scale._errors({"b": 1, "a": 2}) == "3 (a: 2; b: 1)"
