"""Slots: one subprocess per slot, so a handler can always be stopped by force.

Each slot process (see `worker._slot_child`) loads the handlers and calls
`setup(device)` once, then runs one job at a time. The pool lives on the
agent's event loop: it reads slot pipes with `loop.add_reader` (no threads),
cancels through a per-slot `multiprocessing.Event`, and kills and restarts a
slot whose handler ignores a cancel, or whose process died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker._slot_child import slot_main

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
    on_progress: Callable[[JobKey, dict[str, Any]], None]
    #: the one outcome of a job: status completed|failed|cancelled|killed|crashed
    on_done: Callable[[JobKey, dict[str, Any]], None]


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


class SlotPool:
    """A fixed number of slot processes running jobs one at a time each."""

    def __init__(self, slots: int, child_config: dict[str, Any], callbacks: SlotCallbacks) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._config = dict(child_config, parent_pid=os.getpid())
        self._cb = callbacks
        self.slots = [Slot(index=i) for i in range(slots)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_ready: asyncio.Future[dict[str, Any]] | None = None
        self._closing = False
        self._no_restart = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Start every slot; return the first slot's ready report (types, device)."""
        self._loop = asyncio.get_running_loop()
        self._first_ready = self._loop.create_future()
        for slot in self.slots:
            self._spawn(slot)
        return await self._first_ready

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
        """Slots ready to take a job now."""
        return sum(1 for s in self.slots if s.state == "idle")

    def busy_count(self) -> int:
        """Slots running a job."""
        return sum(1 for s in self.slots if s.state == "busy")

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
    def start_job(self, key: JobKey, job: dict[str, Any]) -> Slot | None:
        """Start `job` on an idle slot; None if every slot is busy or starting."""
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
        slot = self.slot_of(key)
        if slot is None:
            return False
        slot.cancel_event.set()
        return True

    def kill_job(self, key: JobKey) -> bool:
        """Stop `key` by force: kill its slot process (on_done gets status "killed")
        and start a fresh one, which calls setup() again and then reports idle."""
        slot = self.slot_of(key)
        if slot is None:
            return False
        log.warning("killing slot %d to stop job %s attempt %s", slot.index, *key)
        self._detach(slot)
        slot.process.kill()
        slot.state = "restarting"
        slot.job = None
        self._cb.on_done(key, {"status": "killed"})
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
                if "cuda_memory" in msg[3]:  # the slot's latest CUDA figures (metrics)
                    slot.info["cuda_memory"] = msg[3]["cuda_memory"]
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
            self._cb.on_done(key, {"status": "crashed", "exit_code": code})
        if self._first_ready is not None and not self._first_ready.done() and was == "starting":
            # Setup crashed the process: surface it instead of waiting forever.
            self._first_ready.set_exception(
                RuntimeError(f"slot {slot.index} died during setup (exit code {code})")
            )
            return
        self._restart_later(slot, SLOT_RESTART_DELAY_S)
