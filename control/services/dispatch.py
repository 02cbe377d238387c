"""Dispatch: worker stream sessions, the replica's claim loop, and cancel fan-out.

One `Dispatcher` per control replica holds the sessions of the workers connected
to it. It decides, the store (`control.store.dispatch`) talks to Postgres, and
the servicer (`control.servicers.worker_service`) converts protobuf.

- **Pull, not push.** A session's credits grow with the worker's `Ready` and
  shrink by one per `Assign`; the claim asks for at most the credits left, and
  only the claim loop assigns, so a worker never gets more than it asked for.
- **One claim loop per replica**, woken by `spool_jobs` hints (NOTIFY from any
  replica, and the Notifier's in-process fan-out after a local submit), by new
  credits, by the moment a delayed job or a key's start interval comes due, and
  by a safety-net poll. Idle sessions claim in turn; once a claim comes back short
  for a (job types, labels) signature, the others sharing it skip the round, so a
  hundred idle workers cost one empty query per hint, not a hundred.
- **One writer per session.** Worker messages are applied in order by one task,
  a batch per transaction; progress is coalesced per job (latest wins, at most
  one write per `PROGRESS_FLUSH_INTERVAL_S`, the last value always written before
  the attempt's outcome).
- **Cancel reaches the holder wherever it is connected**: a `spool_cancel` hint
  (payload: job id) makes the replica holding that attempt re-read the row and
  send `Cancel`; a periodic sweep covers hints lost while the listener was down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from control import metrics
from control.auth import ANONYMOUS, FLEET_TENANT, Principal
from control.errors import PermissionDenied, is_bad_value
from control.store import dispatch as store
from control.store import leases as leases_store
from control.store import workers as workers_store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: safety-net claim poll while some worker has credits
DISPATCH_POLL_INTERVAL_S = 1.0
#: at most one "when is the next delayed job due" query per this interval
LOOK_AHEAD_MIN_INTERVAL_S = 0.1
#: safety-net sweep for cancel requests whose NOTIFY was lost
CANCEL_SWEEP_INTERVAL_S = 1.0
#: at most one progress write per job per this interval (the last is always written)
PROGRESS_FLUSH_INTERVAL_S = 0.2
#: cancel hints kept queued (beyond it the sweep catches up)
CANCEL_HINT_QUEUE_SIZE = 10_000
#: a claim that keeps coming back with held-back keyed jobs is retried this often per round
MAX_CLAIMS_PER_SESSION_ROUND = 4
#: attempts to apply a batch of worker messages before giving the stream up
APPLY_ATTEMPTS = 3


def utcnow() -> datetime:
    """The current time, timezone-aware (the store takes `now` from its callers)."""
    return datetime.now(UTC)


def new_replica_id() -> str:
    """A name for this control replica, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Hello:
    """The first message of a stream: who the worker is."""

    worker_id: str
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    job_types: Sequence[str] = ()
    slots: int = 1
    device: Mapping[str, Any] = field(default_factory=dict)
    version: str = ""
    #: attempts it still runs from before a reconnect
    running: Sequence[tuple[str, int]] = ()
    #: it reads many messages in one (ConnectResponse.Batch)
    accepts_batches: bool = False
    #: jobs it takes beyond its free slots
    prefetch: int = 0


@dataclass(frozen=True)
class Ready:
    credits: int


@dataclass(frozen=True)
class ProgressReport:
    job_id: str
    attempt: int
    progress: Mapping[str, Any]


@dataclass(frozen=True)
class Heartbeat:
    running: Sequence[tuple[str, int]]


@dataclass(frozen=True)
class Completed:
    job_id: str
    attempt: int
    result: Mapping[str, Any] | None
    outputs: Sequence[str] = ()


@dataclass(frozen=True)
class Failed:
    job_id: str
    attempt: int
    error: Mapping[str, Any]
    retry_delay_s: float | None = None


@dataclass(frozen=True)
class Released:
    job_id: str
    attempt: int
    reason: str = ""


@dataclass(frozen=True)
class Canceled:
    job_id: str
    attempt: int


@dataclass(frozen=True)
class Unreadable:
    """A worker message that could not be read (a malformed job id, say): refused alone.

    An unreadable outcome is acknowledged as refused, so the worker stops resending it.
    """

    job_id: str
    attempt: int
    reason: str
    outcome: bool = False


Inbound = Ready | ProgressReport | Heartbeat | Completed | Failed | Released | Canceled | Unreadable
#: the messages that end an attempt
Outcome = Completed | Failed | Released | Canceled

#: queued after the last message of a stream
_END = object()


@dataclass(frozen=True)
class Assign:
    """Control → worker: run this attempt (a full job row)."""

    job: Mapping[str, Any]
    attempt: int
    lease_deadline: datetime


@dataclass(frozen=True)
class CancelAttempt:
    """Control → worker: stop this attempt; it is stopped by force after `grace_s`."""

    job_id: str
    attempt: int
    reason: str
    grace_s: float


@dataclass(frozen=True)
class OutcomeAck:
    """Control → worker: this attempt's outcome was committed (applied, or refused for good)."""

    job_id: str
    attempt: int
    applied: bool
    reason: str = ""


@dataclass(frozen=True)
class Acknowledge:
    """Control → worker: the outcomes of one committed batch."""

    outcomes: tuple[OutcomeAck, ...]


Outbound = Assign | CancelAttempt | Acknowledge

#: the error an attempt ends with when its outcome cannot be stored
INVALID_RESULT = "INVALID_RESULT"
#: the error of a queued job whose stored values break the claim statement
UNCLAIMABLE = "UNCLAIMABLE"
#: why an outcome for an attempt that is not running on its worker is refused
STALE_REASON = "the attempt is not running on this worker"


class BadValue(Exception):
    """A batch of worker messages holds a value the database refuses (see db.is_bad_value)."""


# ------------------------------------------------------------------ sessions


class WorkerSession:
    """The control side of one worker's Connect stream."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        hello: Hello,
        connected_at: datetime,
        tenants: Sequence[str] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.hello = hello
        self.worker_id = hello.worker_id
        self.connected_at = connected_at
        #: the tenants whose jobs it may run (None: every tenant, a shared fleet)
        self.tenants = tuple(tenants) if tenants is not None else None
        self.signature = (
            frozenset(hello.job_types),
            tuple(sorted(hello.labels.items())),
            self.tenants,
        )
        #: jobs the worker may still be given (Ready adds, Assign consumes)
        self.credits = 0
        #: attempts this session believes the worker runs
        self.running: set[tuple[str, int]] = set()
        #: what the stream writes, in order; None (queued once, by `end_stream`) ends it
        self.outbox: asyncio.Queue[Outbound | None] = asyncio.Queue()
        self._stream_ended = False
        #: Assigns taken off the outbox but not sent (the stream was closing)
        self.unsent: list[Assign] = []
        self.closed = False
        self._cancel_sent: set[tuple[str, int]] = set()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._pending_progress: dict[str, tuple[int, Mapping[str, Any]]] = {}
        self._last_flush = 0.0

    # --- called by the servicer -------------------------------------------------

    def receive(self, msg: Inbound) -> None:
        """Take one message from the worker (never blocks; applied in order)."""
        if isinstance(msg, Ready):
            self._add_credits(msg.credits)
        elif isinstance(msg, Unreadable):
            log.warning("worker %s: refused a message about job %r attempt %d: %s",
                        self.worker_id, msg.job_id[:100], msg.attempt, msg.reason)  # fmt: skip
            if msg.outcome:
                self._acknowledge([OutcomeAck(msg.job_id, msg.attempt, False, msg.reason)])
        else:
            self._inbox.put_nowait(msg)

    def end_stream(self) -> None:
        """End the stream after what is queued (idempotent): whoever decides it ends calls this.

        The worker broke the stream, the writer gave up on the database, the
        replica stops, or the same worker connected again.
        """
        if not self._stream_ended:
            self._stream_ended = True
            self.outbox.put_nowait(None)

    def send_cancel(self, job_id: str, attempt: int, reason: str) -> None:
        """Tell the worker to stop an attempt (once per attempt)."""
        ref = (job_id, attempt)
        if self.closed or ref in self._cancel_sent:
            return
        self._cancel_sent.add(ref)
        self.outbox.put_nowait(
            CancelAttempt(job_id, attempt, reason, self.dispatcher.settings.cancel_grace_s)
        )

    # --- internals ---------------------------------------------------------------

    def _add_credits(self, credits: int) -> None:
        if credits <= 0:
            return
        # Credits never exceed the slots (and prefetch) the worker declared,
        # whatever it sends.
        cap = max(1, self.hello.slots) + max(0, self.hello.prefetch)
        self.credits = min(cap, self.credits + credits)
        # Even a session that still had credits: a finished job may have freed its
        # concurrency key for a job no hint announces.
        self.dispatcher.wake()

    def _assign(self, row: Mapping[str, Any]) -> None:
        ref = (str(row["id"]), row["attempt"])
        self.credits -= 1
        self.running.add(ref)
        self.outbox.put_nowait(Assign(row, row["attempt"], row["lease_expires_at"]))

    def _acknowledge(self, acks: Sequence[OutcomeAck]) -> None:
        # Acks go out even while the stream closes: the worker may still read them.
        if acks:
            self.outbox.put_nowait(Acknowledge(tuple(acks)))

    def _forget(self, job_id: str, attempt: int) -> None:
        self.running.discard((job_id, attempt))
        self._cancel_sent.discard((job_id, attempt))

    def finish(self) -> None:
        """The stream ended: the writer applies what is queued, then stops."""
        self._inbox.put_nowait(_END)

    async def run_writer(self) -> None:
        """Apply the worker's messages in order, a batch per transaction, until `finish`."""
        ended = False
        while not ended:
            timeout = None
            if self._pending_progress:
                timeout = max(0.0, self._last_flush + PROGRESS_FLUSH_INTERVAL_S - time.monotonic())
            try:
                batch = [await asyncio.wait_for(self._inbox.get(), timeout)]
            except TimeoutError:
                batch = []
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            if _END in batch:
                ended = True
                batch = [m for m in batch if m is not _END]
                # Whatever progress is pending is the latest: write it now.
                self._last_flush = 0.0
            await self._apply_batch(batch)

    async def _apply_batch(self, batch: list[Inbound]) -> None:
        for msg in batch:
            if isinstance(msg, ProgressReport):
                self._pending_progress[msg.job_id] = (msg.attempt, msg.progress)
        rest = [
            m for m in batch if isinstance(m, Heartbeat | Completed | Failed | Released | Canceled)
        ]
        flush_due = time.monotonic() >= self._last_flush + PROGRESS_FLUSH_INTERVAL_S
        if not rest and not (self._pending_progress and flush_due):
            return
        try:
            after = await self._apply_retrying(rest, flush_due)
        except BadValue:
            # Some message holds a value the database refuses: apply them one by
            # one, so only that message is refused and the others still land.
            after = await self._apply_one_by_one(rest)
        for action in after:
            action()

    async def _apply_retrying(
        self, msgs: Sequence[Heartbeat | Outcome], flush_due: bool
    ) -> list[Any]:
        return await self._retrying(lambda: self._apply_messages(msgs, flush_due))

    async def _retrying(self, unit: Callable[[], Awaitable[T]]) -> T:
        """Run a unit of database work, retrying a lost connection; BadValue for a refused value.

        When the database stays away, the error ends the stream: the worker keeps
        its unacknowledged outcomes and resends them after it reconnects.
        """
        for attempt in range(APPLY_ATTEMPTS):
            try:
                return await unit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_bad_value(exc):
                    raise BadValue(str(exc)) from exc
                if attempt == APPLY_ATTEMPTS - 1:
                    raise
                log.warning("worker %s: applying messages failed (%s), retrying",
                            self.worker_id, exc.__class__.__name__)  # fmt: skip
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _in_transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """`work(session)` in a transaction of its own, retried like a batch."""

        async def tx() -> T:
            async with self.dispatcher.db.transaction() as s:
                return await work(s)

        return await self._retrying(tx)

    async def _apply_one_by_one(self, msgs: Sequence[Heartbeat | Outcome]) -> list[Any]:
        """The slow path after a BadValue: each progress value and message on its own."""
        after: list[Any] = []
        for job_id, (attempt, progress) in list(self._pending_progress.items()):
            try:
                await self._in_transaction(
                    lambda s, j=job_id, a=attempt, p=progress: store.write_progress(
                        s, self.worker_id, [(j, a, p)], utcnow()
                    )
                )
            except BadValue:
                log.warning("worker %s: dropped progress of job %s that cannot be stored",
                            self.worker_id, job_id)  # fmt: skip
            self._pending_progress.pop(job_id, None)
        self._last_flush = time.monotonic()
        for msg in msgs:
            try:
                after += await self._apply_retrying([msg], flush_due=False)
            except BadValue as exc:
                if isinstance(msg, Heartbeat):
                    log.warning("worker %s: a heartbeat could not be applied: %s",
                                self.worker_id, exc)  # fmt: skip
                    continue
                after += await self._refuse_outcome(msg, str(exc))
        return after

    async def _refuse_outcome(self, msg: Outcome, why: str) -> list[Any]:
        """An outcome the database refuses: the attempt FAILS with INVALID_RESULT instead."""
        log.warning("worker %s: the %s of job %s attempt %d cannot be stored (%s); "
                    "failing the attempt with %s", self.worker_id, type(msg).__name__.lower(),
                    msg.job_id, msg.attempt, why[:300], INVALID_RESULT)  # fmt: skip
        error = {
            "code": INVALID_RESULT,
            "message": f"the worker's {type(msg).__name__.lower()} message could not be stored",
            "retryable": False,
        }
        d = self.dispatcher
        try:
            t = await self._in_transaction(
                lambda s: store.fail_attempt(
                    s,
                    msg.job_id,
                    msg.attempt,
                    self.worker_id,
                    error,
                    utcnow(),
                    backoff_base_s=d.settings.retry_backoff_base_s,
                    backoff_max_s=d.settings.retry_backoff_max_s,
                )
            )
        except BadValue:
            log.exception("worker %s: job %s could not be failed either", self.worker_id,
                          msg.job_id)  # fmt: skip
            t = None
        ack = OutcomeAck(msg.job_id, msg.attempt, False, f"{INVALID_RESULT}: cannot be stored")
        return [
            lambda: self._forget(msg.job_id, msg.attempt),
            lambda: metrics.count_finished([t]),
            lambda: self._acknowledge([ack]),
        ]

    async def _apply_messages(
        self, msgs: Sequence[Heartbeat | Outcome], flush_due: bool
    ) -> list[Any]:
        """Heartbeats, then progress, then every outcome, a statement per run.

        The final progress of an attempt is written before its outcome (so its
        PROGRESS event precedes the terminal one); consecutive outcomes of one
        kind are applied by one statement.
        """
        now = utcnow()
        after: list[Any] = []
        acks: list[OutcomeAck] = []
        pending = dict(self._pending_progress)
        outcomes = [m for m in msgs if not isinstance(m, Heartbeat)]
        progress = []
        for msg in outcomes:
            p = pending.pop(msg.job_id, None)
            if p is not None and p[0] == msg.attempt:
                progress.append((msg.job_id, *p))
        if flush_due and pending:
            progress += [(job_id, a, p) for job_id, (a, p) in pending.items()]
            pending = {}
        # Each statement commits on its own (no BEGIN/COMMIT round trips): every one
        # is a transition complete in itself, applied in order.
        async with self.dispatcher.db.autocommit() as s:
            for msg in msgs:
                if isinstance(msg, Heartbeat):
                    await self._heartbeat(s, msg, now, after)
            events: list[Mapping[str, Any]] = []
            if progress:
                events += await store.write_progress(s, self.worker_id, progress, now)
            finished: list[store.Transition] = []
            for run in _runs(outcomes):
                moved = await self._outcomes(s, run, now)
                for msg, t in zip(run, moved, strict=True):
                    acks.append(self._settled(msg, t, after))
                    if t is not None:
                        finished.append(t)
        # Committed: this replica's watchers need not wait for the NOTIFY.
        self.dispatcher.notifier.publish_events(
            itertools.chain(events, (t.event for t in finished))
        )
        if finished:
            after.append(lambda: metrics.count_finished(finished))
        # Committed (only this task touches the pending progress).
        if len(pending) < len(self._pending_progress):
            self._last_flush = time.monotonic()
        self._pending_progress = pending
        after.append(lambda: self._acknowledge(acks))
        return after

    async def _heartbeat(self, s: Any, msg: Heartbeat, now: datetime, after: list[Any]) -> None:
        d = self.dispatcher
        refs = set(msg.running)
        await workers_store.touch_heartbeat(s, self.worker_id, self.connected_at, now)
        kept = await store.extend_leases(s, self.worker_id, refs, now, lease_s=d.settings.lease_s)
        for job_id, attempt in refs - kept:
            # Not this worker's any more (reaped, timed out, finished, re-run): stop it.
            after.append(
                lambda j=job_id, a=attempt: self.send_cancel(j, a, "attempt no longer leased")
            )

    async def _outcomes(
        self, s: Any, run: Sequence[Outcome], now: datetime
    ) -> list[store.Transition | None]:
        """Apply outcomes of one kind in one statement; a Transition (or None: refused) each."""
        settings = self.dispatcher.settings
        w = self.worker_id
        first = run[0]
        if isinstance(first, Completed):
            items = [(m.job_id, m.attempt, m.result, m.outputs) for m in run]  # type: ignore[union-attr]
            return await store.complete_attempts(s, w, items, now)
        if isinstance(first, Failed):
            return await store.fail_attempts(
                s, w, [(m.job_id, m.attempt, m.error, m.retry_delay_s) for m in run],  # type: ignore[union-attr]
                now, backoff_base_s=settings.retry_backoff_base_s,
                backoff_max_s=settings.retry_backoff_max_s,
            )  # fmt: skip
        if isinstance(first, Released):
            items = [(m.job_id, m.attempt, m.reason) for m in run]  # type: ignore[union-attr]
            return await store.release_attempts(s, w, items, now)
        if isinstance(first, Canceled):
            return await store.confirm_canceled_many(
                s, w, [(m.job_id, m.attempt) for m in run], now
            )
        raise TypeError(f"unexpected message {first!r}")  # pragma: no cover

    def _settled(self, msg: Outcome, t: store.Transition | None, after: list[Any]) -> OutcomeAck:
        """What follows an applied (or refused) outcome once the transaction commits."""
        after.append(lambda: self._forget(msg.job_id, msg.attempt))
        if t is None:
            metrics.IGNORED.labels(kind=type(msg).__name__.lower()).inc()
        return OutcomeAck(msg.job_id, msg.attempt, t is not None, "" if t else STALE_REASON)


def _runs(msgs: Sequence[Outcome]) -> list[list[Outcome]]:
    """Consecutive messages of one type, in order."""
    runs: list[list[Outcome]] = []
    for msg in msgs:
        if runs and type(runs[-1][0]) is type(msg):
            runs[-1].append(msg)
        else:
            runs.append([msg])
    return runs


# ------------------------------------------------------------------ dispatcher


class Dispatcher:
    """The replica's worker sessions, its claim loop and its cancel fan-out."""

    def __init__(self, db: Any, notifier: Any, settings: Any, replica_id: str | None = None):
        self.db = db
        self.notifier = notifier
        self.settings = settings
        self.replica_id = replica_id or new_replica_id()
        self.sessions: dict[int, WorkerSession] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._rotation = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Future[Any]] = set()
        #: (worker id, claim time) of claims whose started jobs could not be handed back yet
        self._unread_claims: set[tuple[str, datetime]] = set()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the wake-up channels and start the named loops."""
        jobs_sub = self.notifier.subscribe("spool_jobs")
        # Cancel hints name jobs (a reaper's statement may name hundreds at once).
        cancel_sub = self.notifier.subscribe("spool_cancel", maxsize=CANCEL_HINT_QUEUE_SIZE)
        self._subs = [jobs_sub, cancel_sub]
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="dispatch.claim"),
            asyncio.create_task(self._jobs_hints(jobs_sub), name="dispatch.jobs-hints"),
            asyncio.create_task(self._cancel_hints(cancel_sub), name="dispatch.cancel-hints"),
            asyncio.create_task(self._cancel_sweep(), name="dispatch.cancel-sweep"),
        ]

    async def stop(self) -> None:
        """Stop the loops and end every open stream (its worker reconnects elsewhere)."""
        for session in list(self.sessions.values()):
            session.end_stream()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Units of database work the loops started run to their end (never cut mid-query).
        await asyncio.gather(*self._inflight, return_exceptions=True)
        for sub in getattr(self, "_subs", []):
            sub.close()
        self._tasks = []
        # Streams that could not say goodbye leave their workers marked connected here.
        try:
            async with self.db.transaction() as s:
                await workers_store.mark_replica_disconnected(s, self.replica_id, utcnow())
        except Exception:
            log.exception("marking this replica's workers disconnected failed")

    async def guarded(self, coro: Awaitable[T]) -> T:
        """Run a unit of database work that cancelling the caller must not cut short.

        A task cancelled mid-query can leak its connection; this runs the work as
        its own task, shielded, and `stop()` waits for whatever is still running.
        """
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    def wake(self) -> None:
        """Ask the claim loop for a round soon (cheap; coalesces)."""
        self._wake.set()

    # --- sessions ----------------------------------------------------------------

    async def open_session(self, hello: Hello, principal: Principal = ANONYMOUS) -> WorkerSession:
        """Register a worker whose Hello arrived; keep the leases it still holds.

        The worker id is bound to the key that first registered it: another key
        presenting it is PERMISSION_DENIED. Attempts it reports that are no longer
        its get a Cancel; RUNNING attempts of this worker it does not report (it
        restarted) go back to the queue at once.
        """
        now = utcnow()
        reported = set(hello.running)
        tenants = principal.job_tenants
        async with self.db.transaction() as s:
            registered = await workers_store.upsert_connected(
                s,
                worker_id=hello.worker_id,
                name=hello.name,
                labels=hello.labels,
                job_types=hello.job_types,
                slots=hello.slots,
                device=hello.device,
                version=hello.version,
                replica=self.replica_id,
                now=now,
                owner=principal.owner,
                tenant=tenants[0] if tenants else FLEET_TENANT,
            )
            if not registered:
                raise PermissionDenied(
                    f"worker id {hello.worker_id!r} is registered to another key",
                    reason="WORKER_ID_TAKEN",
                )
            kept = await store.extend_leases(
                s, hello.worker_id, reported, now, lease_s=self.settings.lease_s
            )
            lost = await leases_store.requeue_lost_attempts(s, hello.worker_id, kept, now)
        # The same worker on an older stream here (not yet noticed dead): end that one.
        for old in self.sessions.values():
            if old.worker_id == hello.worker_id:
                old.closed = True
                old.end_stream()
        session = WorkerSession(self, hello, now, tenants)
        session.running |= kept
        for job_id, attempt in reported - kept:
            session.send_cancel(job_id, attempt, "attempt no longer leased")
        metrics.count_finished(lost)
        if lost:
            log.info("worker %s reconnected without %d attempt(s)", hello.worker_id, len(lost))
        self.sessions[next(self._ids)] = session
        metrics.OPEN_STREAMS.labels(kind="worker").inc()
        log.info(
            "worker %s connected (%s, slots=%d, types=%s, kept %d attempt(s))",
            hello.worker_id,
            hello.name,
            hello.slots,
            ",".join(hello.job_types),
            len(kept),
        )
        return session

    async def close_session(self, session: WorkerSession) -> None:
        """The stream ended: forget the session, mark the worker disconnected.

        Its RUNNING attempts keep their leases and come back through the lease reaper
        (or at once if the worker reconnects without them).
        """
        session.closed = True
        for key, s in list(self.sessions.items()):
            if s is session:
                del self.sessions[key]
        metrics.OPEN_STREAMS.labels(kind="worker").dec()
        unsent = [out.job for out in session.unsent]
        while not session.outbox.empty():
            out = session.outbox.get_nowait()
            if isinstance(out, Assign):
                unsent.append(out.job)
        try:
            await self._give_back(session, unsent)
        except Exception:
            log.exception("giving back %d unsent job(s) failed", len(unsent))
        try:
            async with self.db.transaction() as s:
                await workers_store.mark_disconnected(
                    s, session.worker_id, session.connected_at, utcnow()
                )
        except Exception:
            log.exception("marking worker %s disconnected failed", session.worker_id)
        log.info("worker %s disconnected", session.worker_id)

    # --- claim loop --------------------------------------------------------------

    async def _claim_loop(self) -> None:
        next_due: datetime | None = None
        last_look_ahead = 0.0
        while True:
            timeout = DISPATCH_POLL_INTERVAL_S
            if next_due is not None:
                timeout = min(timeout, max(0.0, (next_due - utcnow()).total_seconds()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            if next_due is not None and next_due <= utcnow():
                next_due = None  # due now: this round serves it
            # Looking ahead (when do delayed jobs come due?) is throttled: hints can be many.
            look_ahead = time.monotonic() - last_look_ahead >= LOOK_AHEAD_MIN_INTERVAL_S
            try:
                due = await self.guarded(self._claim_round(look_ahead=look_ahead))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claim round failed")
                await asyncio.sleep(DISPATCH_POLL_INTERVAL_S)
                continue
            if look_ahead:
                last_look_ahead = time.monotonic()
            if due is not None:
                next_due = due if next_due is None else min(next_due, due)

    async def _claim_round(self, *, look_ahead: bool) -> datetime | None:
        """Let every session with credits claim, in turn; returns when to wake next."""
        for worker_id, at in sorted(self._unread_claims):
            await self._hand_back_claim(worker_id, at)
        sessions = [s for s in self.sessions.values() if s.credits > 0 and not s.closed]
        if not sessions:
            return None
        self._rotation = (self._rotation + 1) % len(sessions)
        sessions = sessions[self._rotation :] + sessions[: self._rotation]
        exhausted: set[Any] = set()
        retry_at: datetime | None = None
        for session in sessions:
            for _ in range(MAX_CLAIMS_PER_SESSION_ROUND):
                if session.credits <= 0 or session.closed or session.signature in exhausted:
                    break
                result = await self._claim_for(session)
                if result.retry_at is not None:
                    retry_at = min(retry_at or result.retry_at, result.retry_at)
                if not result.held_back:
                    if session.credits > 0:
                        exhausted.add(session.signature)
                    break
        idle = [s for s in self.sessions.values() if s.credits > 0 and not s.closed]
        if idle and look_ahead:
            types = sorted({t for s in idle for t in s.hello.job_types})
            async with self.db.transaction() as s:
                due = await store.next_due_at(s, types, utcnow())
            if due is not None:
                retry_at = min(retry_at or due, due)
        return retry_at

    async def _claim_for(self, session: WorkerSession) -> store.ClaimResult:
        hello = session.hello
        now = utcnow()
        result, error = await self._claim(session, hello, now)
        if session.closed:
            await self._give_back(session, result.jobs)
        else:
            sent = utcnow()
            for row in result.jobs:
                session._assign(row)
                # Claimable since it was created, or since not_before (delays, retries, requeues).
                ready_since = max(row["created_at"], row["not_before"])
                metrics.DISPATCH_LATENCY.observe(max(0.0, (sent - ready_since).total_seconds()))
            metrics.count_by_type(metrics.DISPATCHED, (row["type"] for row in result.jobs))
        if error is not None:
            if not is_bad_value(error):
                raise error
            # A stored value breaks the claim: set that job aside, claim again.
            await self._quarantine_unclaimable(session, error)
            result.held_back = True
        return result

    async def _claim(
        self, session: WorkerSession, hello: Hello, now: datetime
    ) -> tuple[store.ClaimResult, Exception | None]:
        """Claim for one session: the jobs started, and the error that cut the claim short.

        The claim statement runs on an autocommit connection (no BEGIN/COMMIT
        round trips; one that walks the claim index, `Database.claiming`), so
        the jobs it starts are committed RUNNING as it returns.
        If its rows cannot be read back (a stored value this process cannot
        decode) or the connection is lost on the way, the attempts it started
        are handed back at once (`_hand_back_claim`): no job stays RUNNING on a
        worker that never heard of it. Keyed candidates are started in a
        transaction of their own; when that fails, the jobs already started
        are still returned (and sent).
        """
        args = store.claim_args(
            session.worker_id, hello.job_types, hello.labels, session.credits, now,
            lease_s=self.settings.lease_s, tenants=session.tenants,
        )  # fmt: skip
        try:
            async with self.db.claiming() as s:
                started, keyed = await store.claim_unkeyed(s, args)
        except Exception as exc:
            await self._hand_back_claim(session.worker_id, now)
            return store.ClaimResult(), exc
        result = store.ClaimResult(jobs=list(started))
        if keyed:
            try:
                async with self.db.transaction() as s:
                    more, result.retry_at = await store.start_keyed(s, keyed, args)
            except Exception as exc:
                return result, exc
            result.jobs.extend(more)
            result.held_back = len(more) < len(keyed)
        return result, None

    async def _hand_back_claim(self, worker_id: str, now: datetime) -> None:
        """Requeue the attempts a claim at `now` started but nobody read (keeping their budget).

        When even that fails (the database is away), it is tried again before
        the next claim round; until then the attempts hold a lease like any other.
        """
        try:
            async with self.db.autocommit() as s:
                refs = await store.started_by_claim(s, worker_id, now)
                reason = "the claim could not read the job back"
                moved = await store.release_attempts(
                    s, worker_id, [(j, a, reason) for j, a in refs], utcnow(), by="control"
                )
        except Exception:
            log.exception("handing back the jobs of a failed claim for worker %s failed; "
                          "trying again before the next claim", worker_id)  # fmt: skip
            self._unread_claims.add((worker_id, now))
            return
        self._unread_claims.discard((worker_id, now))
        if refs:
            log.warning("a claim for worker %s could not read back %d job(s): handed back",
                        worker_id, len(refs))  # fmt: skip
        metrics.count_finished(moved)

    async def _quarantine_unclaimable(self, session: WorkerSession, exc: Exception) -> None:
        """Find the candidates a claim cannot start and FAIL them, so dispatch goes on.

        Each of the claim's first candidates is claimed alone in a transaction
        that is rolled back (a dry run); the ones whose claim fails on a bad
        value end FAILED with UNCLAIMABLE. One poisoned job never stalls the
        queue for everyone else.
        """
        hello = session.hello
        now = utcnow()
        log.error("claim for worker %s failed on a stored value (%s): looking for the job",
                  session.worker_id, exc.__class__.__name__)  # fmt: skip
        async with self.db.transaction() as s:
            ids = await store.claim_candidates(
                s, hello.job_types, hello.labels, now,
                tenants=session.tenants, limit=max(1, session.credits),
            )  # fmt: skip
        poisoned = []
        for job_id in ids:
            try:
                args = store.claim_args(
                    session.worker_id, hello.job_types, hello.labels, 1, now,
                    lease_s=self.settings.lease_s, tenants=session.tenants, only_id=job_id,
                )  # fmt: skip
                async with self.db.rolled_back() as s:
                    await store.claim_jobs(s, args)
            except Exception as probe_exc:
                if not is_bad_value(probe_exc):
                    raise
                poisoned.append((job_id, probe_exc))
        for job_id, probe_exc in poisoned:
            error = {
                "code": UNCLAIMABLE,
                "message": "a stored value of this job cannot be used to start it "
                f"({probe_exc.__class__.__name__})",
                "retryable": False,
            }
            async with self.db.transaction() as s:
                t = await store.quarantine_job(s, job_id, error, utcnow())
            log.error("job %s quarantined: FAILED with %s", job_id, UNCLAIMABLE)
            metrics.count_finished([t])

    async def _give_back(self, session: WorkerSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Jobs claimed for a stream that closed before they were sent go back at once."""
        if not rows:
            return
        reason = "the stream closed before the job was sent"
        items = [(str(row["id"]), row["attempt"], reason) for row in rows]
        async with self.db.transaction() as s:
            moved = await store.release_attempts(
                s, session.worker_id, items, utcnow(), by="control"
            )
        # A cancel requested meanwhile makes the release a CANCELED.
        metrics.count_finished(moved)

    async def _jobs_hints(self, sub: Any) -> None:
        async for _ in sub:
            self._wake.set()

    # --- cancel fan-out ----------------------------------------------------------

    def _holders(self, job_ids: set[str]) -> dict[WorkerSession, set[tuple[str, int]]]:
        found: dict[WorkerSession, set[tuple[str, int]]] = {}
        for session in self.sessions.values():
            refs = {ref for ref in session.running if ref[0] in job_ids}
            if refs:
                found[session] = refs
        return found

    async def _cancel_hints(self, sub: Any) -> None:
        async for first in sub:
            # Take every hint already queued: one re-read for the lot.
            job_ids = {first, *sub.drain()}
            try:
                if "" in job_ids:
                    # The wildcard (the listener reconnected, hints may be lost).
                    await self.guarded(self._sweep_once())
                else:
                    await self.guarded(self._stop_attempts(self._holders(job_ids)))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel fan-out failed")

    async def _stop_attempts(self, holders: dict[WorkerSession, set[tuple[str, int]]]) -> None:
        if not holders:
            return
        now = utcnow()
        async with self.db.transaction() as s:
            decisions = [
                (session, await leases_store.attempts_to_stop(s, session.worker_id, refs, now))
                for session, refs in holders.items()
            ]
        for session, refs in decisions:
            for job_id, attempt in refs:
                session.send_cancel(job_id, attempt, "cancel requested or timed out")

    async def _cancel_sweep(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_SWEEP_INTERVAL_S)
            try:
                await self.guarded(self._sweep_once())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel sweep failed")

    async def _sweep_once(self) -> None:
        by_worker: dict[str, list[WorkerSession]] = {}
        for session in self.sessions.values():
            if session.running:
                by_worker.setdefault(session.worker_id, []).append(session)
        if not by_worker:
            return
        async with self.db.transaction() as s:
            rows = await leases_store.attempts_to_cancel(s, sorted(by_worker), utcnow())
        for row in rows:
            ref = (str(row.id), row.attempt)
            for session in by_worker.get(row.worker_id, []):
                if ref in session.running:
                    session.send_cancel(ref[0], ref[1], "cancel requested or timed out")
