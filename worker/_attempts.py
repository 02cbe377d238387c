"""What the agent holds about each attempt, and how it ends: the per-attempt state machine.

An attempt arrives by Assign and is held until control acknowledges its
outcome:

    WAITING ──slot frees──▶ RUNNING ──slot outcome──▶ FINISHED ──Ack──▶ (forgotten)
       └────── cancel / timeout / drain ──────────────────▲

Events: Assign, Cancel, the local timeout (a backstop behind control's), the
forced stop after a cancel's grace, drain (release), the slot's `Outcome`, the
Ack. The flags they set (cancel requested, timed out, releasing) decide what a
stopped attempt is reported as (`decide`): Completed, Failed, Canceled or
Released, as plain values. No protobuf here: `worker._stream` encodes them.

`Attempts` drives the slots through `SlotsPort` (a `worker._slots.SlotPool`)
and reports to its owner (the agent) through `AttemptEvents`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from worker._outcome import COMPLETED, CRASHED, FAILED, Coalescer, Outcome, Progress

log = logging.getLogger("spool.worker")

JobKey = tuple[str, int]

#: the most progress updates per second per job on the stream (the last one always goes)
PROGRESS_INTERVAL_S = 0.2
#: used when a Cancel gives no grace period
DEFAULT_CANCEL_GRACE_S = 10.0
#: the worker cancels a job this long after its own timeout if control has not
#: (control enforces timeouts; this is the backstop)
LOCAL_TIMEOUT_MARGIN_S = 2.0

#: what a released attempt tells control while the worker drains
DRAINING = "worker is draining"


# -- terminal outcomes: what control is told ------------------------------------
@dataclass(frozen=True)
class Completed:
    kind: ClassVar[str] = "completed"
    result: dict[str, Any]
    outputs: list[str]


@dataclass(frozen=True)
class Failed:
    kind: ClassVar[str] = "failed"
    code: str
    message: str
    retryable: bool = True
    retry_delay_s: float | None = None


@dataclass(frozen=True)
class Canceled:
    kind: ClassVar[str] = "canceled"


@dataclass(frozen=True)
class Released:
    kind: ClassVar[str] = "released"
    reason: str


Terminal = Completed | Failed | Canceled | Released


@dataclass(frozen=True)
class Assignment:
    """An Assign from control, decoded."""

    key: JobKey
    job_type: str
    #: the job as a slot takes it (worker._attempt.run_attempt's `job`)
    spec: dict[str, Any]
    #: the attempt's timeout (0: none)
    timeout_s: float = 0.0


@dataclass(eq=False)
class Attempt:
    """An attempt this worker holds: waiting for a slot, running, or finished
    with its outcome not yet acknowledged."""

    key: JobKey
    job_type: str
    started: float
    progress: Coalescer[Progress]
    cancel_requested: bool = False
    timed_out: bool = False
    releasing: bool = False
    finished: bool = False
    #: prefetched: waiting here for a free slot (the job to start, as the slot takes it)
    waiting_spec: dict[str, Any] | None = None
    kill_handle: Any = None
    timeout_handle: Any = None

    @property
    def state(self) -> str:
        if self.finished:
            return "finished"
        return "waiting" if self.waiting_spec is not None else "running"

    def cancel_timers(self) -> None:
        """Drop every pending callback of this attempt."""
        for h in (self.kill_handle, self.timeout_handle):
            if h is not None:
                h.cancel()
        self.kill_handle = self.timeout_handle = None


def decide(attempt: Attempt, outcome: Outcome) -> Terminal:
    """What control is told about an attempt that ended with `outcome`.

    A handler's own result stands. A stopped one (cancelled, killed, crashed)
    is Released while draining, else Canceled after a Cancel, else Failed.
    """
    if outcome.status == COMPLETED:
        return Completed(outcome.result or {}, list(outcome.outputs))
    if outcome.status == FAILED:
        return Failed(outcome.code, outcome.message, outcome.retryable, outcome.retry_delay_s)
    if attempt.releasing:
        return Released(DRAINING)
    if attempt.cancel_requested:
        return Canceled()
    if attempt.timed_out:
        return Failed("DEADLINE_EXCEEDED", "the attempt passed its timeout")
    if outcome.status == CRASHED:
        return Failed("WORKER_CRASH", f"the slot process died (exit code {outcome.exit_code})")
    return Failed("HANDLER_ERROR", "the handler raised Cancelled without a cancel")


class SlotsPort(Protocol):
    """What the state machine needs of the slots (worker._slots.SlotPool)."""

    def start_job(self, key: JobKey, job: dict[str, Any]) -> object | None: ...
    def idle_count(self) -> int: ...
    def cancel(self, key: JobKey) -> bool: ...
    def kill_job(self, key: JobKey) -> bool: ...


class AttemptEvents(Protocol):
    """How the state machine reports to the agent."""

    def progress_open(self) -> bool:
        """True while progress can go out (the stream is up)."""

    def send_progress(self, key: JobKey, progress: Progress) -> None:
        """A coalesced progress value for the stream."""

    def finished(
        self, attempt: Attempt, terminal: Terminal, last: Progress | None, outcome: Outcome
    ) -> None:
        """An attempt ended: `last` is its progress not yet sent (goes first)."""

    def capacity_changed(self) -> None:
        """A prefetched attempt left without using a slot: credits may be due."""


#: call_later(delay_s, fn, *args) -> a handle with cancel() (asyncio's, or a fake clock's)
CallLater = Callable[..., Any]


class Attempts:
    """Every attempt this worker holds, and their transitions."""

    def __init__(
        self,
        slots: SlotsPort,
        events: AttemptEvents,
        *,
        prefetch: int = 0,
        call_later: CallLater | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = slots
        self._events = events
        self.prefetch = prefetch
        self._call_later = call_later
        self._clock = clock
        #: every attempt held, by (job id, attempt)
        self.table: dict[JobKey, Attempt] = {}
        #: prefetched attempts waiting for a free slot, in arrival order
        self.waiting: deque[JobKey] = deque()
        #: attempts held and not finished (running or waiting)
        self.unfinished = 0

    def _later(self, delay_s: float, fn: Callable[..., None], *args: Any) -> Any:
        call_later = self._call_later or asyncio.get_running_loop().call_later
        return call_later(delay_s, fn, *args)

    # -- Assign ---------------------------------------------------------------
    def assign(self, a: Assignment, *, draining: bool, served: Container[str]) -> str | None:
        """Take an assigned attempt: start it, or keep it for a slot (prefetch).

        Returns the reason to release it at once, or None (taken, or a
        duplicate Assign, ignored).
        """
        key = a.key
        if key in self.table:
            log.warning("duplicate Assign for job %s attempt %d ignored", *key)
            return None
        if draining:
            return DRAINING
        if a.job_type not in served:
            return f"job type {a.job_type!r} is not served here"
        run = Attempt(key=key, job_type=a.job_type, started=self._clock(),
                      progress=self._coalescer(key))  # fmt: skip
        # Held before it starts: a slot whose pipe breaks in start_job reports the
        # crash at once, and that outcome must find its attempt.
        self.table[key] = run
        self.unfinished += 1
        if self._slots.start_job(key, a.spec) is not None:
            log.debug("job %s attempt %d (%s) started", key[0], key[1], a.job_type)
        elif len(self.waiting) < self.prefetch:
            run.waiting_spec = a.spec
            self.waiting.append(key)
        else:
            del self.table[key]
            self.unfinished -= 1
            return "no free slot"
        # The attempt's clock runs from its claim, waiting or not.
        if a.timeout_s > 0 and not run.finished:
            run.timeout_handle = self._later(
                a.timeout_s + LOCAL_TIMEOUT_MARGIN_S, self.on_local_timeout, key
            )
        return None

    def _coalescer(self, key: JobKey) -> Coalescer[Progress]:
        return Coalescer(
            lambda p: self._events.send_progress(key, p),
            PROGRESS_INTERVAL_S,
            lambda delay, fn: self._later(delay, fn),
            gate=self._events.progress_open,
            clock=self._clock,
        )

    # -- slots ----------------------------------------------------------------
    def start_waiting(self) -> None:
        """Start prefetched attempts on the free slots, oldest first."""
        while self.waiting and self._slots.idle_count() > 0:
            run = self.table.get(self.waiting.popleft())
            if run is None or run.finished or run.waiting_spec is None:
                continue
            spec, run.waiting_spec = run.waiting_spec, None
            if self._slots.start_job(run.key, spec) is None:  # pragma: no cover - idle checked
                run.waiting_spec = spec
                self.waiting.appendleft(run.key)
                return

    def _end_waiting(self, run: Attempt, outcome: Outcome) -> bool:
        """End a prefetched attempt that never started; False if it runs."""
        if run.waiting_spec is None:
            return False
        run.waiting_spec = None
        with contextlib.suppress(ValueError):
            self.waiting.remove(run.key)
        self.on_outcome(run.key, outcome)
        self._events.capacity_changed()
        return True

    def on_progress(self, key: JobKey, progress: Progress) -> Attempt | None:
        """A running attempt's progress (from its slot); the attempt, if still running."""
        run = self.table.get(key)
        if run is None or run.finished:
            return None
        run.progress.emit(progress)
        return run

    def on_outcome(self, key: JobKey, outcome: Outcome) -> None:
        """The slot's outcome (or the end of a waiting attempt): the attempt is finished."""
        run = self.table.get(key)
        if run is None or run.finished:
            return
        run.cancel_timers()
        run.finished = True
        self.unfinished -= 1
        last = run.progress.finish()
        self._events.finished(run, decide(run, outcome), last, outcome)

    # -- Cancel, timeout, forced stop -----------------------------------------
    def cancel(self, key: JobKey, grace_s: float, reason: str = "") -> None:
        """Control's Cancel: tell the handler, stop it by force after `grace_s`."""
        run = self.table.get(key)
        if run is None or run.finished:
            log.info("Cancel for job %s attempt %d, which is not running here", *key)
            return
        if run.cancel_requested:
            return
        run.cancel_requested = True
        if self._end_waiting(run, Outcome.cancelled()):
            return
        self._slots.cancel(key)
        grace = grace_s or DEFAULT_CANCEL_GRACE_S
        log.info("cancelling job %s attempt %d (%s); forced stop in %.1fs",
                 key[0], key[1], reason or "no reason", grace)  # fmt: skip
        if run.kill_handle is not None:
            run.kill_handle.cancel()
        run.kill_handle = self._later(grace, self.on_force_stop, key)

    def on_local_timeout(self, key: JobKey) -> None:
        run = self.table.get(key)
        if run is None or run.finished or run.cancel_requested:
            return
        log.warning("job %s attempt %d passed its timeout; cancelling", *key)
        run.timed_out = True
        if self._end_waiting(run, Outcome.cancelled()):
            return
        self._slots.cancel(key)
        run.kill_handle = self._later(DEFAULT_CANCEL_GRACE_S, self.on_force_stop, key)

    def on_force_stop(self, key: JobKey) -> None:
        run = self.table.get(key)
        if run is not None and not run.finished:
            log.warning("job %s attempt %d ignored its cancel; stopping it by force", *key)
            self._slots.kill_job(key)

    # -- drain ----------------------------------------------------------------
    def release_waiting(self) -> None:
        """Hand back the prefetched attempts that never started (drain begins)."""
        for key in list(self.waiting):
            run = self.table.get(key)
            if run is not None:
                run.releasing = True
                self._end_waiting(run, Outcome.killed())

    def release_running(self) -> None:
        """Stop every unfinished attempt by force, to be Released (drain grace is over)."""
        for run in list(self.table.values()):
            if not run.finished:
                run.releasing = True
                self._slots.kill_job(run.key)

    # -- stream ---------------------------------------------------------------
    def resume_progress(self) -> None:
        """A stream is up: send the progress held back while there was none."""
        for run in self.table.values():
            if not run.finished:
                run.progress.pump()

    def acked(self, key: JobKey) -> None:
        """Control committed the attempt's outcome: forget it."""
        self.table.pop(key, None)

    def close(self) -> None:
        """Drop every timer (the worker stops)."""
        for run in self.table.values():
            run.cancel_timers()
            run.progress.finish()
