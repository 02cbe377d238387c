"""Housekeeping of the jobs table: the retention sweeper and the job-count folder.

The sweeper deletes terminal jobs (their events cascade) past their age. One
named background task per replica; several replicas sweeping at once split the
work (SKIP LOCKED). Deletes in bounded batches, each its own short transaction,
so it never holds many locks or one long transaction.

The folder moves the terminal-count deltas the jobs triggers append into
`job_counts` (control.schema), so what GetStats adds up stays small.
"""

from __future__ import annotations

import logging

from control.config import Settings
from control.db import Database
from control.periodic import Periodic
from control.store import jobs as store

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000
#: how often each replica folds the job-count deltas
FOLD_COUNTS_INTERVAL_S = 1.0


class RetentionSweeper:
    """Deletes jobs finished more than `settings.retention_s` ago, every sweep interval."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.retention_s = settings.retention_s
        self.interval_s = settings.sweep_interval_s
        self._loop = Periodic("retention-sweeper", self.sweep_once, self.interval_s)

    async def sweep_once(self) -> int:
        """Delete every expired job now, batch by batch; returns how many."""
        total = 0
        while True:
            async with self.db.transaction() as s:
                deleted = await store.delete_expired_jobs(s, self.retention_s, SWEEP_BATCH)
            total += deleted
            if deleted < SWEEP_BATCH:
                break
        if total:
            log.info("retention sweep deleted %d job(s)", total)
        return total

    async def start(self) -> None:
        """Start the named loop `retention-sweeper`."""
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop (a sweep in flight finishes)."""
        await self._loop.stop()


class JobCountsFolder:
    """Folds the job-count deltas into job_counts every FOLD_COUNTS_INTERVAL_S."""

    def __init__(self, db: Database, interval_s: float = FOLD_COUNTS_INTERVAL_S) -> None:
        self.db = db
        self._loop = Periodic("job-counts-folder", self.fold_once, interval_s)

    async def fold_once(self) -> int:
        """Fold what is pending now (one statement); returns the counts it touched."""
        async with self.db.autocommit() as s:
            return await store.fold_job_counts(s)

    async def start(self) -> None:
        """Start the named loop `job-counts-folder`."""
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop (a fold in flight finishes)."""
        await self._loop.stop()
