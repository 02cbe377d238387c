"""Slots: where jobs run, one at a time per slot, `slots` at once in all.

A job type runs where its handler's `isolation` says:

- "process" (the default): in a slot subprocess, so a handler can always be
  stopped by force. Each slot process (see `worker._slot_child`) loads the
  handlers and calls `setup(device)` once, then runs one job at a time. The
  pool reads slot pipes with `loop.add_reader` (no threads), cancels through
  a per-slot `multiprocessing.Event`, and kills and restarts a slot whose
  handler ignores a cancel, or whose process died.
- "thread": on a daemon thread of this (the agent's) process, with no pipe
  and no pickling; the handler is set up once here at `start`. A cancel is
  cooperative only: a thread cannot be killed, so `kill_job` reports the job
  "killed" at once and abandons its thread, which runs on until the handler
  returns; its outcome is then dropped (see `abandoned_threads`).
- "async": the handler's `async def run` is a task on this process's event
  loop: no thread hop at all. `kill_job` reports it "killed" and cancels the
  task (its outcome is dropped the same way).

Either way a running job holds one of the `slots`: `idle_count()` (the
worker's credits) is what is free for a job of any type. A worker that
serves only thread types starts no slot process at all. The pool lives on the
agent's event loop; thread jobs report to it with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker._attempt import run_attempt, run_attempt_async, setup_handlers
from worker._outcome import Outcome, Progress
from worker._slot_child import resolve_device, slot_main
from worker.handlers import thread_handlers
from worker.sdk import Handler

log = logging.getLogger("spool.worker.slots")

#: how long a slot may take to exit after "stop" before it is killed
SLOT_STOP_TIMEOUT_S = 5.0
#: pause before restarting a slot that died on its own (avoid a crash loop)
SLOT_RESTART_DELAY_S = 0.5

JobKey = tuple[str, int]


@dataclass
class SlotCallbacks:
    """How the pool reports to its owner (all called on the event loop)."""

    #: a slot became free to take a job (first start, job done, restart)
    on_idle: Callable[[], None]
    #: coalesced progress of a running job
    on_progress: Callable[[JobKey, Progress], None]
    #: the one outcome of a job: status completed|failed|cancelled|killed|crashed
    on_done: Callable[[JobKey, Outcome], None]


@dataclass
class Slot:
    """One slot process and what it is doing."""

    index: int
    process: Any = None
    conn: Any = None
    cancel_event: Any = None
    state: str = "starting"  # starting | idle | busy | restarting | stopped
    job: JobKey | None = None
    info: dict[str, Any] = field(default_factory=dict)
    incarnation: int = 0


class CancelFlag:
    """A cancel flag read by one thread job: `threading.Event` without the Condition.

    Only ever set, never waited on, so a bool is enough (its reads and writes
    are atomic); one is made per job, where an Event's lock showed up.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(eq=False)
class ThreadJob:
    """One job running in this process: on a pool thread, or as a task ("async")."""

    key: JobKey
    #: the job's cancel flag (what `ctx.cancelled` reads)
    cancel_flag: CancelFlag = field(default_factory=CancelFlag)
    #: set by `kill_job` or `stop`: whatever the thread still reports is dropped
    abandoned: bool = False
    #: the task of an "async" job (None on a thread)
    task: asyncio.Task[Outcome] | None = None


class _Threads:
    """Daemon threads that run thread jobs, reused from one job to the next.

    A thread is started whenever no idle one waits, so a thread stuck in an
    abandoned job never delays the next job: it is simply no longer idle. At
    most `keep_idle` threads stay parked between jobs. A thread parks itself
    before it reports (`report(work())`), so the next job, started from that
    report, finds it idle instead of starting another thread.
    """

    def __init__(self, keep_idle: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0
        self._keep_idle = keep_idle
        self._closed = False

    def submit(self, work: Callable[[], Any], report: Callable[[Any], None]) -> None:
        """Run `work()` on a thread, then `report(its result)` on the same thread."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # one parked thread will take it
            else:
                self._started += 1
                name = f"spool-thread-job-{self._started}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
        self._queue.put((work, report))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            work, report = item
            result = work()
            with self._lock:
                stay = not self._closed and self._idle < self._keep_idle
                if stay:
                    self._idle += 1
            report(result)
            if not stay:
                return

    def close(self) -> None:
        """Let parked threads exit; busy ones exit when their job returns."""
        with self._lock:
            self._closed = True
            parked, self._idle = self._idle, 0
        for _ in range(parked):
            self._queue.put(None)


def _probe_device(spec: str) -> dict[str, Any]:
    """The device report without a slot process to ask (a pool of thread types only).

    `resolve_device` imports torch to look for CUDA; the worker process must
    not (memory, start time), so when torch is installed and the spec is not
    plain cpu, a throwaway process asks for us.
    """
    if (spec or "auto").strip().lower() == "cpu" or importlib.util.find_spec("torch") is None:
        return resolve_device(spec)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as probe:
        return probe.submit(resolve_device, spec).result()


class SlotPool:
    """`slots` places to run a job: slot processes, and threads for thread types."""

    def __init__(self, slots: int, child_config: dict[str, Any], callbacks: SlotCallbacks) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._config = dict(child_config, parent_pid=os.getpid())
        self._cb = callbacks
        #: jobs that may run at once, on processes and threads together
        self.size = slots
        #: the slot processes (none when every type served runs on threads)
        self.slots = [Slot(index=i) for i in range(slots)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_ready: asyncio.Future[dict[str, Any]] | None = None
        self._closing = False
        self._no_restart = False
        self._tasks: set[asyncio.Task] = set()
        #: thread job types, set up in this process
        self._thread_handlers: dict[str, Handler] = {}
        self._thread_jobs: dict[JobKey, ThreadJob] = {}
        self._threads = _Threads(keep_idle=slots)
        self._abandoned = 0
        self._device = "cpu"

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Start the slots; return the ready report: types, failed, device.

        Thread types are found (and set up) here; slot processes are started
        unless every type asked for (`types`) is one of them.
        """
        self._loop = asyncio.get_running_loop()
        types = self._config.get("types")
        try:
            classes = thread_handlers(self._config.get("handlers", ""), types=types)
        except Exception as exc:  # a bad --handlers spec: stop the worker, say why
            raise RuntimeError(f"cannot load the job types: {type(exc).__name__}: {exc}") from exc
        if types is not None and all(t in classes for t in types):
            self.slots = []
            device = await asyncio.to_thread(_probe_device, self._config.get("device", "auto"))
            child: dict[str, Any] = {"types": [], "failed": {}, "device": device}
        else:
            self._config["thread_types"] = sorted(classes)
            self._first_ready = self._loop.create_future()
            for slot in self.slots:
                self._spawn(slot)
            child = await self._first_ready
        self._device = child["device"]["device"]
        handlers, failed = await asyncio.to_thread(setup_handlers, classes, self._device)
        self._thread_handlers = handlers
        if handlers:
            log.info("job types on threads of the worker process: %s", ", ".join(sorted(handlers)))
        if not self.slots:
            self._loop.call_soon(self._cb.on_idle)
        return dict(
            child,
            types=sorted(set(child["types"]) | set(handlers)),
            failed={**child["failed"], **failed},
        )

    def configure(self, **values: Any) -> None:
        """Add settings for the slot processes (before `start`), e.g. the worker id."""
        self._config.update(values)

    def _spawn(self, slot: Slot) -> None:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        slot.cancel_event = self._mp.Event()
        slot.incarnation += 1
        cfg = dict(self._config, slot=slot.index)
        slot.process = self._mp.Process(
            target=slot_main,
            args=(child_conn, slot.cancel_event, cfg),
            name=f"spool-slot-{slot.index}",
            daemon=True,
        )
        slot.process.start()
        child_conn.close()
        slot.conn = parent_conn
        slot.state = "starting"
        assert self._loop is not None
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, slot, slot.incarnation)

    def stop_restarting(self) -> None:
        """Do not replace slots killed from now on (the worker is draining)."""
        self._no_restart = True

    async def stop(self) -> None:
        """Stop every slot: ask politely, kill what does not exit in time."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for run in self._thread_jobs.values():
            run.abandoned = True
            run.cancel_flag.set()
            self._abandoned += 1
        self._thread_jobs.clear()
        self._threads.close()
        for slot in self.slots:
            self._detach(slot)
            if slot.conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    slot.conn.send(("stop",))
                    # A busy slot would finish its job first: do not wait for that.
                    if slot.state == "busy" and slot.process is not None:
                        slot.process.kill()
        for slot in self.slots:
            await self._reap(slot, SLOT_STOP_TIMEOUT_S)
            slot.state = "stopped"

    async def _reap(self, slot: Slot, wait_s: float) -> None:
        proc = slot.process
        if proc is None:
            return
        if proc.pid is None:  # start() itself failed
            slot.process = None
            return
        await asyncio.to_thread(proc.join, wait_s)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
        with contextlib.suppress(ValueError):
            proc.close()
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        slot.process = None

    def _detach(self, slot: Slot) -> None:
        if slot.conn is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(slot.conn.fileno())

    # -- queries --------------------------------------------------------------
    def idle_count(self) -> int:
        """Slots ready to take a job of any type now."""
        free = self.size - self.busy_count()
        if self.slots:  # a process type needs an idle slot process too
            free = min(free, sum(1 for s in self.slots if s.state == "idle"))
        return max(free, 0)

    def busy_count(self) -> int:
        """Slots running a job (on a slot process or a thread)."""
        return sum(1 for s in self.slots if s.state == "busy") + len(self._thread_jobs)

    def abandoned_threads(self) -> int:
        """Threads still running a job that was killed (their outcome will be dropped)."""
        return self._abandoned

    def is_thread_type(self, job_type: str) -> bool:
        """True if jobs of `job_type` run on a thread of this process."""
        return job_type in self._thread_handlers or not self.slots

    def cuda_memory(self) -> list[dict[str, Any] | None]:
        """The latest CUDA figures of each live slot (None for a slot off CUDA)."""
        return [s.info.get("cuda_memory") for s in self.slots if s.state in ("idle", "busy")]

    def slot_of(self, key: JobKey) -> Slot | None:
        """The slot running job `key`, if any."""
        for s in self.slots:
            if s.state == "busy" and s.job == key:
                return s
        return None

    # -- jobs -----------------------------------------------------------------
    def start_job(self, key: JobKey, job: dict[str, Any]) -> Slot | ThreadJob | None:
        """Start `job` on a thread or an idle slot process (by its type's isolation);
        None if every slot is busy or starting."""
        if self.busy_count() >= self.size:
            return None
        if self.is_thread_type(job["type"]):
            handler = self._thread_handlers.get(job["type"])
            if getattr(handler, "isolation", "thread") == "async":
                return self._start_async_job(key, job)
            return self._start_thread_job(key, job)
        for slot in self.slots:
            if slot.state == "idle":
                slot.cancel_event.clear()
                slot.state = "busy"
                slot.job = key
                try:
                    slot.conn.send(("run", job))
                except (OSError, ValueError) as exc:
                    log.warning("slot %d pipe broke: %s", slot.index, exc)
                    self._on_dead(slot, slot.incarnation)
                    return slot
                return slot
        return None

    def cancel(self, key: JobKey) -> bool:
        """Set the cancel flag of the slot running `key` (the handler sees ctx.cancelled)."""
        run = self._thread_jobs.get(key)
        if run is not None:
            run.cancel_flag.set()
            return True
        slot = self.slot_of(key)
        if slot is None:
            return False
        slot.cancel_event.set()
        return True

    def kill_job(self, key: JobKey) -> bool:
        """Stop `key` by force: kill its slot process (on_done gets status "killed")
        and start a fresh one, which calls setup() again and then reports idle.

        A thread job cannot be killed: it is reported "killed" all the same, its
        slot is free at once, and its thread is abandoned (outcome dropped)."""
        run = self._thread_jobs.pop(key, None)
        if run is not None:
            run.abandoned = True
            run.cancel_flag.set()
            if run.task is not None:
                run.task.cancel()
            self._abandoned += 1
            log.warning("abandoning the thread of job %s attempt %s (it cannot be killed; "
                        "%d abandoned thread(s) still running)", *key, self._abandoned)  # fmt: skip
            self._cb.on_done(key, Outcome.killed())
            assert self._loop is not None
            self._loop.call_soon(self._on_thread_slot_free)
            return True
        slot = self.slot_of(key)
        if slot is None:
            return False
        log.warning("killing slot %d to stop job %s attempt %s", slot.index, *key)
        self._detach(slot)
        slot.process.kill()
        slot.state = "restarting"
        slot.job = None
        self._cb.on_done(key, Outcome.killed())
        self._restart_later(slot, 0.0)
        return True

    def _restart_later(self, slot: Slot, delay: float) -> None:
        async def restart() -> None:
            await self._reap(slot, SLOT_STOP_TIMEOUT_S)
            if delay:
                await asyncio.sleep(delay)
            if not self._closing and not self._no_restart:
                self._spawn(slot)

        task = asyncio.get_running_loop().create_task(restart(), name=f"slot-{slot.index}-restart")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- thread jobs ----------------------------------------------------------
    def _start_thread_job(self, key: JobKey, job: dict[str, Any]) -> ThreadJob:
        run = ThreadJob(key=key)
        self._thread_jobs[key] = run
        self._threads.submit(
            lambda: self._run_thread_job(run, job),
            lambda outcome: self._post(self._on_thread_done, run, outcome),
        )
        return run

    def _start_async_job(self, key: JobKey, job: dict[str, Any]) -> ThreadJob:
        run = ThreadJob(key=key)
        self._thread_jobs[key] = run

        def send_progress(progress: Progress) -> None:
            # Called on the loop, or from the coalescer's timer thread.
            self._post(self._on_thread_progress, run, progress)

        assert self._loop is not None
        run.task = self._loop.create_task(
            run_attempt_async(job, self._thread_handlers, self._device, self._config,
                              send_progress, run.cancel_flag),
            name=f"job-{key[0]}-{key[1]}",
        )  # fmt: skip
        run.task.add_done_callback(lambda task: self._on_async_done(run, task))
        return run

    def _on_async_done(self, run: ThreadJob, task: asyncio.Task[Outcome]) -> None:
        if task.cancelled():
            outcome = Outcome.killed()
        elif task.exception() is not None:  # BaseException: what a slot would die of
            log.error("job %s attempt %s ended its task: %r", *run.key, task.exception())
            outcome = Outcome.crashed(None)
        else:
            outcome = task.result()
        self._on_thread_done(run, outcome)

    def _run_thread_job(self, run: ThreadJob, job: dict[str, Any]) -> Outcome:
        """On a pool thread: run the job to its outcome (handed to the loop after)."""

        def send_progress(progress: Progress) -> None:
            self._post(self._on_thread_progress, run, progress)

        try:
            outcome = run_attempt(job, self._thread_handlers, self._device, self._config,
                                  send_progress, run.cancel_flag)  # fmt: skip
        except BaseException as exc:  # SystemExit from a handler: what a slot would die of
            log.error("job %s attempt %s ended its thread: %r", *run.key, exc)
            code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else None
            outcome = Outcome.crashed(code)
        return outcome

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_thread_progress(self, run: ThreadJob, progress: Progress) -> None:
        if not run.abandoned:
            self._cb.on_progress(run.key, progress)

    def _on_thread_done(self, run: ThreadJob, outcome: Outcome) -> None:
        if run.abandoned:
            self._abandoned -= 1
            log.info("abandoned job %s attempt %s returned (%s); outcome dropped",
                     *run.key, outcome.status)  # fmt: skip
            return
        self._thread_jobs.pop(run.key, None)
        self._cb.on_done(run.key, outcome)
        self._cb.on_idle()

    def _on_thread_slot_free(self) -> None:
        if not self._closing:
            self._cb.on_idle()

    # -- pipe reader ----------------------------------------------------------
    def _on_readable(self, slot: Slot, incarnation: int) -> None:
        if slot.incarnation != incarnation or slot.conn is None:
            return
        try:
            while slot.conn.poll():
                self._handle(slot, slot.conn.recv())
        except (EOFError, OSError):
            self._on_dead(slot, incarnation)

    def _handle(self, slot: Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "progress":
            key = (msg[1], msg[2])
            if slot.state == "busy" and slot.job == key:
                self._cb.on_progress(key, msg[3])
        elif kind == "done":
            key = (msg[1], msg[2])
            if slot.state == "busy" and slot.job == key:
                slot.state = "idle"
                slot.job = None
                if msg[3].cuda_memory is not None:  # the slot's latest CUDA figures (metrics)
                    slot.info["cuda_memory"] = msg[3].cuda_memory
                self._cb.on_done(key, msg[3])
                self._cb.on_idle()
        elif kind == "ready":
            slot.info = msg[1]
            slot.state = "idle"
            log.info("slot %d ready: types=%s device=%s", slot.index, msg[1]["types"],
                     msg[1]["device"]["device"])  # fmt: skip
            if self._first_ready is not None and not self._first_ready.done():
                self._first_ready.set_result(msg[1])
            self._cb.on_idle()

    def _on_dead(self, slot: Slot, incarnation: int) -> None:
        if slot.incarnation != incarnation or self._closing:
            return
        self._detach(slot)
        key, was = slot.job, slot.state
        code = slot.process.exitcode if slot.process is not None else None
        slot.state = "restarting"
        slot.job = None
        log.error("slot %d process died (exit code %s) while %s", slot.index, code, was)
        if was == "busy" and key is not None:
            self._cb.on_done(key, Outcome.crashed(code))
        if self._first_ready is not None and not self._first_ready.done() and was == "starting":
            # Setup crashed the process: surface it instead of waiting forever.
            self._first_ready.set_exception(
                RuntimeError(f"slot {slot.index} died during setup (exit code {code})")
            )
            return
        self._restart_later(slot, SLOT_RESTART_DELAY_S)
