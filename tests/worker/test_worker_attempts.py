"""The progress coalescer and the per-attempt state machine, on a fake clock (no I/O)."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

from worker._attempts import (
    DEFAULT_CANCEL_GRACE_S,
    LOCAL_TIMEOUT_MARGIN_S,
    PROGRESS_INTERVAL_S,
    Assignment,
    Attempt,
    Attempts,
    Canceled,
    Completed,
    Failed,
    Released,
    decide,
)
from worker._outcome import Coalescer, Outcome


class Clock:
    """A fake monotonic clock with a timer queue (`call_later` / `Schedule`)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[Timer] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Any, *args: Any) -> Timer:
        t = Timer(self.now + delay, fn, args)
        self.timers.append(t)
        return t

    def advance(self, dt: float) -> None:
        """Move time on, firing due timers in order."""
        end = self.now + dt
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.at <= end),
                         key=lambda t: t.at)  # fmt: skip
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = t.at
            t.fn(*t.args)
        self.now = end

    def pending(self) -> int:
        return sum(1 for t in self.timers if not t.cancelled)


class Timer:
    def __init__(self, at: float, fn: Any, args: tuple) -> None:
        self.at, self.fn, self.args, self.cancelled = at, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


# -- Coalescer --------------------------------------------------------------------
def _coalescer(clock: Clock, sent: list, **kw: Any) -> Coalescer[int]:
    return Coalescer(sent.append, 1.0, clock.call_later, clock=clock, **kw)


def test_coalescer_first_at_once_then_latest_once_per_interval() -> None:
    clock, sent = Clock(), []
    c = _coalescer(clock, sent)
    c.emit(1)
    assert sent == [1]  # nothing went out before: at once
    for v in range(2, 50):
        c.emit(v)
        clock.advance(0.01)
    assert sent == [1]  # within the interval: kept, latest wins
    clock.advance(1.0)
    assert sent == [1, 49] and c.pending is None
    clock.advance(5.0)
    assert sent == [1, 49] and clock.pending() == 0  # nothing new: no timer, no resend
    c.emit(50)
    assert sent == [1, 49, 50]  # the interval has passed: at once again


def test_coalescer_close_delivers_the_final_value_and_stops() -> None:
    clock, sent = Clock(), []
    c = _coalescer(clock, sent)
    c.emit(1)
    c.emit(2)
    c.close()
    assert sent == [1, 2] and clock.pending() == 0
    c.emit(3)
    clock.advance(2.0)
    assert sent == [1, 2]


def test_coalescer_finish_hands_back_what_was_not_sent() -> None:
    clock, sent = Clock(), []
    c = _coalescer(clock, sent)
    c.emit(1)
    c.emit(2)
    assert c.finish() == 2 and sent == [1] and clock.pending() == 0
    assert c.finish() is None
    c.emit(3)
    clock.advance(2.0)
    assert sent == [1]


def test_coalescer_gate_holds_values_until_pumped() -> None:
    clock, sent, open_ = Clock(), [], [False]
    c = _coalescer(clock, sent, gate=lambda: open_[0])
    c.emit(1)
    c.emit(2)
    clock.advance(3.0)
    assert sent == [] and c.pending == 2
    open_[0] = True
    c.pump()
    assert sent == [2]
    # A timer that fires while the gate is shut keeps the value for the next pump.
    c.emit(3)
    open_[0] = False
    clock.advance(2.0)
    assert sent == [2] and c.pending == 3
    open_[0] = True
    c.pump()
    assert sent == [2, 3]


def test_coalescer_threadsafe_with_a_real_timer_thread() -> None:
    sent: list[int] = []
    c: Coalescer[int] = Coalescer(sent.append, 0.02, threadsafe=True)

    def hammer() -> None:
        for v in range(20_000):
            c.emit(v)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = time.monotonic() - t0
    c.close()
    assert sent[-1] == 19_999 and c.pending is None  # both threads' last value: delivered
    assert len(sent) <= span / 0.02 + 3, (len(sent), span)


def test_an_outcome_pickles_for_the_slot_pipe() -> None:
    o = Outcome.failed("X", "m", retryable=False, retry_delay_s=1.5)
    o.cuda_memory = {"device": "cuda:0", "allocated": 1}
    assert pickle.loads(pickle.dumps(o)) == o


# -- decide ---------------------------------------------------------------------
def _attempt(**flags: Any) -> Attempt:
    return Attempt(key=("j", 1), job_type="t", started=0.0, progress=Coalescer(print, 1.0),
                   **flags)  # fmt: skip


def test_decide_a_handlers_own_result_stands_whatever_the_flags() -> None:
    run = _attempt(cancel_requested=True, releasing=True, timed_out=True)
    assert decide(run, Outcome.completed({"a": 1}, ["u"])) == Completed({"a": 1}, ["u"])
    failed = Outcome.failed("E", "m", retryable=False, retry_delay_s=2.0)
    assert decide(run, failed) == Failed("E", "m", False, 2.0)


def test_decide_a_stopped_attempt_released_then_canceled_then_failed() -> None:
    for status in ("cancelled", "killed", "crashed"):
        o = Outcome(status, exit_code=9)
        assert decide(_attempt(releasing=True, cancel_requested=True), o) == Released(
            "worker is draining"
        )
        assert decide(_attempt(cancel_requested=True, timed_out=True), o) == Canceled()
        assert decide(_attempt(timed_out=True), o).code == "DEADLINE_EXCEEDED"
    crash = decide(_attempt(), Outcome.crashed(9))
    assert crash == Failed("WORKER_CRASH", "the slot process died (exit code 9)")
    assert decide(_attempt(), Outcome.cancelled()).code == "HANDLER_ERROR"


# -- Attempts -------------------------------------------------------------------
class FakeSlots:
    def __init__(self, slots: int) -> None:
        self.free = slots
        self.running: set = set()
        self.cancelled: list = []
        self.killed: list = []
        self.on_kill: Any = None

    def start_job(self, key, job):
        if self.free <= 0:
            return None
        self.free -= 1
        self.running.add(key)
        return object()

    def idle_count(self) -> int:
        return self.free

    def cancel(self, key) -> bool:
        self.cancelled.append(key)
        return key in self.running

    def kill_job(self, key) -> bool:
        self.killed.append(key)
        if key not in self.running:
            return False
        self.done(key)
        self.on_kill(key, Outcome.killed())  # what SlotPool does: on_done at once
        return True

    def done(self, key) -> None:
        self.running.discard(key)
        self.free += 1


class Events:
    def __init__(self) -> None:
        self.open = True
        self.progress: list = []
        self.ended: dict = {}
        self.last: dict = {}
        self.capacity = 0

    def progress_open(self) -> bool:
        return self.open

    def send_progress(self, key, p) -> None:
        self.progress.append((key, p))

    def finished(self, attempt, terminal, last, outcome) -> None:
        self.ended[attempt.key] = terminal
        self.last[attempt.key] = last

    def capacity_changed(self) -> None:
        self.capacity += 1


def _machine(slots: int = 1, prefetch: int = 0):
    clock, fs, ev = Clock(), FakeSlots(slots), Events()
    a = Attempts(fs, ev, prefetch=prefetch, call_later=clock.call_later, clock=clock)
    fs.on_kill = a.on_outcome
    return a, fs, ev, clock


def _assign(n: int, timeout_s: float = 0.0, job_type: str = "t") -> Assignment:
    return Assignment(key=(f"j{n}", 1), job_type=job_type, spec={"type": job_type},
                      timeout_s=timeout_s)  # fmt: skip


def test_assign_starts_prefetches_or_releases() -> None:
    a, fs, ev, _ = _machine(slots=1, prefetch=1)
    assert a.assign(_assign(1), draining=False, served={"t"}) is None
    assert a.table[("j1", 1)].state == "running"
    assert a.assign(_assign(2), draining=False, served={"t"}) is None
    assert a.table[("j2", 1)].state == "waiting" and list(a.waiting) == [("j2", 1)]
    assert a.assign(_assign(3), draining=False, served={"t"}) == "no free slot"
    assert a.assign(_assign(4), draining=True, served={"t"}) == "worker is draining"
    assert "not served" in a.assign(_assign(5, job_type="x"), draining=False, served={"t"})
    assert a.assign(_assign(1), draining=False, served={"t"}) is None  # duplicate: ignored
    assert set(a.table) == {("j1", 1), ("j2", 1)} and a.unfinished == 2
    # The slot frees: the waiting attempt starts on it.
    fs.done(("j1", 1))
    a.on_outcome(("j1", 1), Outcome.completed({}, []))
    a.start_waiting()
    assert a.table[("j2", 1)].state == "running" and not a.waiting
    assert ev.ended == {("j1", 1): Completed({}, [])} and a.unfinished == 1
    # Held until the Ack.
    assert a.table[("j1", 1)].finished
    a.acked(("j1", 1))
    assert ("j1", 1) not in a.table


def test_cancel_signals_then_forces_a_stop_after_the_grace() -> None:
    a, fs, ev, clock = _machine()
    a.assign(_assign(1), draining=False, served={"t"})
    key = ("j1", 1)
    a.cancel(key, grace_s=0.5)
    a.cancel(key, grace_s=0.5)  # twice: once
    assert fs.cancelled == [key] and not ev.ended
    clock.advance(0.49)
    assert not fs.killed
    clock.advance(0.02)
    assert fs.killed == [key] and ev.ended[key] == Canceled()
    a.cancel(key, grace_s=1)  # finished: nothing happens
    assert fs.cancelled == [key]


def test_a_handler_that_stops_on_cancel_is_canceled_and_its_timers_dropped() -> None:
    a, fs, ev, clock = _machine()
    a.assign(_assign(1, timeout_s=5), draining=False, served={"t"})
    key = ("j1", 1)
    a.cancel(key, grace_s=0)  # no grace given: the default
    assert clock.pending() == 2  # the forced stop and the local timeout
    assert clock.timers[-1].at == clock.now + DEFAULT_CANCEL_GRACE_S
    fs.done(key)
    a.on_outcome(key, Outcome.cancelled())
    assert ev.ended[key] == Canceled() and clock.pending() == 0
    a.on_outcome(key, Outcome.killed())  # a second outcome is ignored
    assert ev.ended[key] == Canceled()


def test_local_timeout_cancels_then_fails_deadline_exceeded() -> None:
    a, fs, ev, clock = _machine()
    a.assign(_assign(1, timeout_s=1.0), draining=False, served={"t"})
    key = ("j1", 1)
    clock.advance(1.0 + LOCAL_TIMEOUT_MARGIN_S + 0.01)
    assert fs.cancelled == [key] and a.table[key].timed_out
    clock.advance(DEFAULT_CANCEL_GRACE_S)
    assert fs.killed == [key]
    assert ev.ended[key] == Failed("DEADLINE_EXCEEDED", "the attempt passed its timeout")


def test_cancel_or_timeout_of_a_waiting_attempt_ends_it_without_a_slot() -> None:
    a, fs, ev, clock = _machine(slots=1, prefetch=2)
    for n in (1, 2, 3):
        a.assign(_assign(n, timeout_s=1.0), draining=False, served={"t"})
    a.cancel(("j2", 1), grace_s=1)
    assert ev.ended[("j2", 1)] == Canceled() and fs.cancelled == [] and ev.capacity == 1
    a.table[("j1", 1)].cancel_requested = True  # j1's timeout is then not acted on
    clock.advance(1.0 + LOCAL_TIMEOUT_MARGIN_S + 0.01)
    assert ev.ended[("j3", 1)].code == "DEADLINE_EXCEEDED" and not a.waiting


def test_drain_releases_waiting_at_once_and_running_when_stopped() -> None:
    a, fs, ev, _ = _machine(slots=1, prefetch=1)
    a.assign(_assign(1), draining=False, served={"t"})
    a.assign(_assign(2), draining=False, served={"t"})
    a.release_waiting()
    assert ev.ended == {("j2", 1): Released("worker is draining")}
    a.release_running()
    assert fs.killed == [("j1", 1)]
    assert ev.ended[("j1", 1)] == Released("worker is draining") and a.unfinished == 0


def test_progress_is_coalesced_held_offline_and_the_last_goes_with_the_outcome() -> None:
    a, fs, ev, clock = _machine()
    a.assign(_assign(1), draining=False, served={"t"})
    key = ("j1", 1)
    for i in range(10):
        a.on_progress(key, {"done": i})
    assert ev.progress == [(key, {"done": 0})]
    clock.advance(PROGRESS_INTERVAL_S)
    assert ev.progress[-1] == (key, {"done": 9}) and len(ev.progress) == 2
    ev.open = False  # the stream is down: held back
    a.on_progress(key, {"done": 10})
    clock.advance(1.0)
    assert len(ev.progress) == 2
    ev.open = True
    a.resume_progress()
    assert ev.progress[-1] == (key, {"done": 10})
    a.on_progress(key, {"done": 11})  # too soon: kept, then sent with the outcome
    fs.done(key)
    a.on_outcome(key, Outcome.completed({}, []))
    assert ev.last[key] == {"done": 11} and len(ev.progress) == 3 and clock.pending() == 0
    assert a.on_progress(key, {"done": 12}) is None


def test_a_slot_that_dies_as_it_takes_the_job_reports_the_crash() -> None:
    """SlotPool reports a broken pipe in start_job at once: the attempt must be there."""
    a, fs, ev, _ = _machine(slots=1)

    def start_and_die(key, job):
        a.on_outcome(key, Outcome.crashed(1))
        return object()

    fs.start_job = start_and_die
    assert a.assign(_assign(1, timeout_s=5.0), draining=False, served={"t"}) is None
    assert ev.ended[("j1", 1)].code == "WORKER_CRASH"
    assert a.unfinished == 0
