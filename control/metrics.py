"""Prometheus metrics of the control plane, served on `/metrics`.

Counters and histograms move where things happen (submit, dispatch, finish);
the gauges that describe the whole queue (jobs by state, depth, oldest age,
connected workers) are refreshed from Postgres by a background task, so every
replica reports the same numbers and a scrape never touches the database.

The registry is prometheus_client's process-global one: a process hosting
several control planes (tests) shares the counters, and serves them once.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from control.periodic import Periodic
from control.schema import JOB_STATES, TERMINAL_STATES

# The endpoint, shared with the worker: metrics.serve(port) / metrics.shutdown(port).
from spool.metrics_http import serve as serve
from spool.metrics_http import shutdown as shutdown

JOBS = Gauge("spool_jobs", "Jobs by state (all tenants).", ["state"])
QUEUE_DEPTH = Gauge("spool_queue_depth", "QUEUED jobs whose not_before has passed.")
OLDEST_QUEUED_AGE = Gauge(
    "spool_oldest_queued_age_seconds", "Age of the oldest claimable QUEUED job."
)
CONNECTED_WORKERS = Gauge("spool_connected_workers", "Workers connected to any replica.")
OPEN_STREAMS = Gauge("spool_open_streams", "Open streams on this replica.", ["kind"])
DB_POOL_IN_USE = Gauge("spool_db_pool_in_use", "Database connections checked out.")
DB_POOL_SIZE = Gauge(
    "spool_db_pool_size", "Database connections the pool holds open (in use + idle)."
)

SUBMITTED = Counter("spool_jobs_submitted_total", "Jobs submitted.", ["type"])
IGNORED = Counter(
    "spool_worker_messages_ignored_total",
    "Worker outcomes refused by fencing (stale attempt), by message kind.",
    ["kind"],
)
DISPATCHED = Counter("spool_jobs_dispatched_total", "Attempts assigned to workers.", ["type"])
FINISHED = Counter(
    "spool_jobs_finished_total", "Jobs that reached a terminal state.", ["type", "state"]
)
DISPATCH_LATENCY = Histogram(
    "spool_dispatch_latency_seconds",
    "Time from a job becoming claimable to its Assign being sent.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

#: the kinds of `spool_open_streams`; these and every state are present (at 0) from the start
STREAM_KINDS = ("worker", "watch")
for _kind in STREAM_KINDS:
    OPEN_STREAMS.labels(kind=_kind)
for _state in JOB_STATES:
    JOBS.labels(state=_state)


def count_by_type(counter: Counter, job_types: Iterable[str]) -> None:
    """Add each job type's number of occurrences to `counter` (labelled by type), once a type."""
    for job_type, n in collections.Counter(job_types).items():
        counter.labels(type=job_type).inc(n)


def count_finished(transitions: Iterable[Any]) -> None:
    """Count the transitions (`control.store.dispatch.Transition`) that ended a job."""
    counts = collections.Counter(
        (t.job_type, t.state) for t in transitions if t is not None and t.state in TERMINAL_STATES
    )
    for (job_type, state), n in counts.items():
        FINISHED.labels(type=job_type, state=state).inc(n)


def apply_stats(stats: Mapping[str, Any], pool: Any = None) -> None:
    """Set the queue gauges from one stats reading (and the pool gauges from `pool`)."""
    for state, count in stats["by_state"].items():
        JOBS.labels(state=state).set(count)
    QUEUE_DEPTH.set(stats["queue_depth"])
    OLDEST_QUEUED_AGE.set(stats["oldest_queued_age_s"])
    CONNECTED_WORKERS.set(stats["connected_workers"])
    if pool is not None:
        in_use, size = pool.pool_stats()
        DB_POOL_IN_USE.set(in_use)
        DB_POOL_SIZE.set(size)


class MetricsRefresher:
    """The control plane component that keeps the queue gauges fresh.

    `read_stats` is an async callable returning a mapping with `by_state`
    (state → count), `queue_depth`, `oldest_queued_age_s` and
    `connected_workers`; it opens and owns its own session.
    """

    def __init__(
        self,
        read_stats: Callable[[], Awaitable[Mapping[str, Any]]],
        pool: Any,
        interval_s: float,
    ) -> None:
        self.read_stats = read_stats
        self.pool = pool
        self._loop = Periodic("metrics.refresh", self.refresh_once, interval_s)

    async def refresh_once(self) -> None:
        """Read the stats once and set the gauges."""
        apply_stats(await self.read_stats(), self.pool)

    async def start(self) -> None:
        """Start the named refresh loop."""
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop (a refresh in flight finishes)."""
        await self._loop.stop()
