"""The faults of a chaos run: a seeded plan, and the injector that carries it out.

Kinds (each planned at least once when the run is long enough):

- `worker_kill`: SIGKILL a worker's process group (agent and slot processes), start it again
  with the same worker id (a new instance): its attempts come back as WORKER_LOST.
- `worker_stop`: SIGSTOP a worker's group for longer than the lease, then SIGCONT: its
  attempts are requeued (LEASE_EXPIRED) and its late messages must be fenced off.
- `replica_kill`: SIGKILL a control replica, start it again on the same port: its workers
  reconnect through their proxies to the other replica, its clients retry there.
- `pg_restart`: `pg_ctl stop -m fast`, a short outage, start again (embedded Postgres only).
- `stream_cut`: abort a worker's TCP connections at its proxy (no process dies).
- `watch_cut`: cancel a few live WatchProgress calls; the watchers resume with after_seq.

Faults run one at a time, each fully recovered before the next begins, so at
least one replica is always up; none starts after the chaos window, except the
first of a kind that has not run yet (a slow machine still sees every kind).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections import Counter
from dataclasses import dataclass, field

from bench.chaos.cluster import LEASE_S, Cluster
from bench.chaos.traffic import Clock, Watchers

log = logging.getLogger("spool.chaos")

KINDS = ("worker_kill", "worker_stop", "replica_kill", "pg_restart", "stream_cut", "watch_cut")
#: a stopped worker stays stopped this much longer than the lease
STOP_PAST_LEASE_S = 1.5
#: how long Postgres stays down in a restart (kept under the lease: workers should ride it out)
PG_DOWN_S = 1.0
#: pause before a killed process is started again
RESTART_PAUSE_S = 0.5
#: mean gap between the end of one fault and the start of the next
MEAN_GAP_S = 3.0


@dataclass(frozen=True)
class Fault:
    """One planned fault: what, on which target, when (seconds into the run)."""

    at_s: float
    kind: str
    target: int


@dataclass
class Injected:
    """One fault as carried out (times in run seconds)."""

    kind: str
    target: str
    start: float
    end: float
    detail: str = ""


def plan_faults(
    rng: random.Random,
    window_s: float,
    *,
    workers: int,
    replicas: int,
    pg_restarts: bool,
    max_faults: int,
) -> list[Fault]:
    """Fault times and targets from the seed: every kind once (shuffled), then random kinds."""
    kinds = [k for k in KINDS if pg_restarts or k != "pg_restart"]
    first = kinds[:]
    rng.shuffle(first)
    faults: list[Fault] = []
    t = 2.0
    while (first or t < window_s - 1.0) and len(faults) < max_faults:
        kind = first.pop() if first else rng.choice(kinds)
        target = rng.randrange(replicas if kind == "replica_kill" else workers)
        faults.append(Fault(round(t, 2), kind, target))
        t += _expected_s(kind) + rng.uniform(0.5, 2 * MEAN_GAP_S)
    return faults


def _expected_s(kind: str) -> float:
    return {
        "worker_stop": LEASE_S + STOP_PAST_LEASE_S,
        "replica_kill": 3.0,
        "pg_restart": PG_DOWN_S + 2.0,
        "worker_kill": 1.5,
    }.get(kind, 0.1)


@dataclass
class Injector:
    """Carries out the plan on the cluster; records what it did and what it skipped."""

    cluster: Cluster
    watchers: Watchers
    clock: Clock
    rng: random.Random
    plan: list[Fault]
    window_s: float
    done: list[Injected] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: faults whose recovery failed (reported as violations)
    failed: list[str] = field(default_factory=list)
    #: (instance, kind, start, end) of every SIGKILL / SIGSTOP a worker instance got
    worker_faults: list[tuple[str, str, float, float]] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.done)

    async def run(self) -> None:
        for fault in self.plan:
            wait = fault.at_s - self.clock.now()
            if wait > 0:
                await asyncio.sleep(wait)
            # Past the window, a fault is skipped, unless its kind has not run yet: every
            # kind runs once even on a slow machine (at most len(KINDS) late faults).
            if self.clock.now() > self.window_s and fault.kind in self.counts():
                self.skipped.append(f"{fault.kind} at {fault.at_s}s: past the chaos window")
                continue
            start = self.clock.now()
            try:
                target, detail = await getattr(self, "_" + fault.kind)(fault.target)
            except Exception as exc:
                # A fault the cluster did not recover from (e.g. a replica that never
                # serves again) is a finding, not a reason to stop checking.
                log.exception("fault %s on %d failed", fault.kind, fault.target)
                self.failed.append(f"{fault.kind} on {fault.target} at {start:.1f}s: {exc!r}")
                continue
            self.done.append(Injected(fault.kind, target, start, self.clock.now(), detail))
            log.info("fault %s on %s at %.1fs (%s)", fault.kind, target, start, detail)

    async def _worker_kill(self, i: int) -> tuple[str, str]:
        w = self.cluster.workers[i]
        instance, t = w.instance, self.clock.now()
        w.signal(signal.SIGKILL)
        await w.reap()
        self.worker_faults.append((instance, "kill", t, self.clock.now()))
        await asyncio.sleep(RESTART_PAUSE_S)
        w.start()
        return instance, f"restarted as {w.instance}"

    async def _worker_stop(self, i: int) -> tuple[str, str]:
        w = self.cluster.workers[i]
        instance, t = w.instance, self.clock.now()
        w.signal(signal.SIGSTOP)
        stopped_s = LEASE_S + STOP_PAST_LEASE_S
        await asyncio.sleep(stopped_s)
        w.signal(signal.SIGCONT)
        self.worker_faults.append((instance, "stop", t, self.clock.now()))
        return instance, f"stopped {stopped_s:.1f}s (lease {LEASE_S:.1f}s)"

    async def _replica_kill(self, i: int) -> tuple[str, str]:
        r = self.cluster.replicas[i]
        r.kill()
        await r.reap()
        await asyncio.sleep(RESTART_PAUSE_S)
        r.start()
        await r.wait_serving()
        return f"replica{i}", f"restarted, serving again after {self.clock.now():.1f}s"

    async def _pg_restart(self, _: int) -> tuple[str, str]:
        pg = self.cluster.postgres
        await asyncio.to_thread(pg.stop_server)
        await asyncio.sleep(PG_DOWN_S)
        await asyncio.to_thread(pg.start_server)
        return "postgres", f"down {PG_DOWN_S:.1f}s"

    async def _stream_cut(self, i: int) -> tuple[str, str]:
        n = self.cluster.proxies[i].cut()
        return self.cluster.workers[i].instance, f"{n} connection(s) cut"

    async def _watch_cut(self, _: int) -> tuple[str, str]:
        for _try in range(50):  # wait up to 5 s for a live watcher
            if self.watchers.open_count():
                break
            await asyncio.sleep(0.1)
        n = self.watchers.cut(self.rng, 3)
        return "watchers", f"{n} watcher call(s) cut"
