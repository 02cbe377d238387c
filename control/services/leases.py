"""Background enforcers of leases, deadlines and cancel grace periods.

Every replica runs all three: each pass is a compare-and-set over rows locked
with SKIP LOCKED, so two replicas doing the same pass at once move each job at
most once. Each pass opens and owns its own session. The loops are named tasks
(`control.periodic`) that log a failed pass and carry on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from control import metrics
from control.errors import is_bad_value
from control.periodic import Periodic
from control.services.dispatch import utcnow
from control.store import leases as store
from control.store import workers as workers_store
from control.store.dispatch import Transition

log = logging.getLogger(__name__)

#: how often each enforcer looks (bounded below so tests with short leases stay sharp)
MAX_REAP_INTERVAL_S = 1.0
MIN_REAP_INTERVAL_S = 0.1
#: a worker with no heartbeat for this many leases is marked disconnected
STALE_WORKER_LEASES = 2
#: pause after a failed pass (e.g. the database restarting)
FAILED_PASS_BACKOFF_S = 1.0


class LeaseEnforcers:
    """The lease reaper, the deadline enforcer and the cancel-grace enforcer."""

    def __init__(self, db: Any, settings: Any, replica_id: str) -> None:
        self.db = db
        self.settings = settings
        #: this replica: the reaper judges its own workers and disconnected ones
        self.replica_id = replica_id
        #: a reaper pass failed for want of the database (leases are extended once it is back)
        self._database_was_away = False
        # Check a few times per lease so an expired lease is reaped promptly.
        self.interval_s = min(MAX_REAP_INTERVAL_S, max(MIN_REAP_INTERVAL_S, settings.lease_s / 4))
        passes: dict[str, Callable[[], Awaitable[int]]] = {
            "leases.reaper": self.reap_leases_once,
            "leases.deadlines": self.enforce_deadlines_once,
            "leases.cancel-grace": self.enforce_cancel_grace_once,
        }
        # A pass that moved a full batch goes again at once.
        self._loops = [
            Periodic(
                name,
                one_pass,
                self.interval_s,
                again=lambda moved: moved >= store.REAP_BATCH,
                failed_backoff_s=FAILED_PASS_BACKOFF_S,
            )
            for name, one_pass in passes.items()
        ]

    async def start(self) -> None:
        """Start the three named loops."""
        for loop in self._loops:
            await loop.start()

    async def stop(self) -> None:
        """Stop the loops (a pass in flight finishes: cutting a query short can leak it)."""
        await asyncio.gather(*(loop.stop() for loop in self._loops))

    async def reap_leases_once(self) -> int:
        """Requeue (or fail) RUNNING attempts whose lease passed; returns how many."""
        now = utcnow()
        try:
            async with self.db.transaction() as s:
                if self._database_was_away:
                    # Heartbeats could not land while the database was away: leases that
                    # ran out meanwhile say nothing about the workers. Each running attempt
                    # gets one more lease to be heard of (its worker reconnects) first.
                    n = await store.extend_running_leases(s, now, lease_s=self.settings.lease_s)
                    log.info("database back: %d running lease(s) extended", n)
                # Workers whose replica died without closing their streams: from now
                # on judged here, after one more lease to reconnect.
                stale = now - timedelta(seconds=STALE_WORKER_LEASES * self.settings.lease_s)
                workers, extended = await workers_store.mark_stale_disconnected(
                    s, stale, now, lease_s=self.settings.lease_s
                )
                if workers:
                    log.info(
                        "%d worker(s) unheard for %d leases marked disconnected; "
                        "%d running lease(s) extended",
                        workers,
                        STALE_WORKER_LEASES,
                        extended,
                    )
                moved = await store.reap_expired_leases(s, now, replica=self.replica_id)
        except Exception as exc:
            self._database_was_away = self._database_was_away or not is_bad_value(exc)
            raise
        self._database_was_away = False
        _log_moves("lease expired", moved)
        return len(moved)

    async def enforce_deadlines_once(self) -> int:
        """Fail (or retry) RUNNING attempts past their timeout; returns how many."""
        async with self.db.transaction() as s:
            moved = await store.reap_deadlines(
                s,
                utcnow(),
                backoff_base_s=self.settings.retry_backoff_base_s,
                backoff_max_s=self.settings.retry_backoff_max_s,
            )
        _log_moves("deadline exceeded", moved)
        return len(moved)

    async def enforce_cancel_grace_once(self) -> int:
        """Cancel RUNNING jobs whose cancel grace period is over; returns how many."""
        async with self.db.transaction() as s:
            moved = await store.force_cancel_overdue(
                s, utcnow(), grace_s=self.settings.cancel_grace_s
            )
        _log_moves("cancel grace over", moved)
        return len(moved)


def _log_moves(why: str, moved: list[Transition]) -> None:
    for t in moved:
        log.info("%s: job %s (worker %s) -> %s", why, t.job_id, t.worker_id, t.state)
    metrics.count_finished(moved)
