"""Prometheus metrics of the control plane, served on `/metrics`.

Counters and histograms move where things happen (submit, dispatch, finish);
the gauges that describe the whole queue (jobs by state, depth, oldest age,
connected workers) are refreshed from Postgres by a background task, so every
replica reports the same numbers and a scrape never touches the database.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 5.0

JOBS = Gauge("spool_jobs", "Jobs by state (all tenants).", ["state"])
QUEUE_DEPTH = Gauge("spool_queue_depth", "QUEUED jobs whose not_before has passed.")
OLDEST_QUEUED_AGE = Gauge(
    "spool_oldest_queued_age_seconds", "Age of the oldest claimable QUEUED job."
)
CONNECTED_WORKERS = Gauge("spool_connected_workers", "Workers connected to any replica.")
OPEN_STREAMS = Gauge("spool_open_streams", "Open streams on this replica.", ["kind"])
DB_POOL_IN_USE = Gauge("spool_db_pool_in_use", "Database connections checked out.")
DB_POOL_SIZE = Gauge("spool_db_pool_size", "Database connections held by the pool.")

SUBMITTED = Counter("spool_jobs_submitted_total", "Jobs submitted.", ["type"])
DISPATCHED = Counter("spool_jobs_dispatched_total", "Attempts assigned to workers.", ["type"])
FINISHED = Counter(
    "spool_jobs_finished_total", "Jobs that reached a terminal state.", ["type", "state"]
)
DISPATCH_LATENCY = Histogram(
    "spool_dispatch_latency_seconds",
    "Time from a job becoming claimable to its Assign being sent.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_started_ports: set[int] = set()


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Start the `/metrics` HTTP endpoint once per process (port 0 = disabled)."""
    if port <= 0 or port in _started_ports:
        return
    start_http_server(port, addr=addr, registry=REGISTRY)
    _started_ports.add(port)
    log.info("metrics on http://%s:%d/metrics", addr, port)


async def refresh_forever(read_stats, pool=None) -> None:
    """Refresh the queue gauges every few seconds.

    `read_stats` is an async callable returning a mapping with `by_state`
    (state → count), `queue_depth`, `oldest_queued_age_s` and
    `connected_workers`; it opens and owns its own session.
    """
    while True:
        try:
            stats = await read_stats()
            for state, count in stats["by_state"].items():
                JOBS.labels(state=state).set(count)
            QUEUE_DEPTH.set(stats["queue_depth"])
            OLDEST_QUEUED_AGE.set(stats["oldest_queued_age_s"])
            CONNECTED_WORKERS.set(stats["connected_workers"])
            if pool is not None:
                DB_POOL_IN_USE.set(pool.checkedout())
                DB_POOL_SIZE.set(pool.size())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("metrics refresh failed")
        await asyncio.sleep(REFRESH_INTERVAL_S)
