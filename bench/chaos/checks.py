"""The invariants of a chaos run, checked from the database and from what the API said.

Violations (each with examples):

- `lost_job`: the API returned a job id that is not in the database.
- `stuck`: a job not terminal once the run settled.
- `terminal_count`: a job with no or several terminal STATE events, or a STATE event after it.
- `seq_gap`: a job's `job_events` seqs are not exactly 1..last_seq.
- `fencing`: a SUCCEEDED event from an attempt or worker not the current running one, a
  result naming another attempt or worker, or progress of a stale attempt recorded.
- `terminal_changed`: a terminal job seen (Get / List, or finally in the database) with
  another state, attempt, result, error or worker than when first seen terminal.
- `watch_gap`, `watch_duplicate`, `watch_past_terminal` (a watcher got events after the
  terminal one, or did not end at it), `watch_no_terminal`, `watch_not_ended` (no end of
  stream), `watch_slow_end` (the stream ended long after the terminal event).
- `internal_status`: a client call answered INTERNAL or UNKNOWN; `unexpected_status`: any
  other error that is not UNAVAILABLE / DEADLINE_EXCEEDED; `call_gave_up`: an idempotent
  call retried for a minute without success.
- `dedupe`: a Submit repeating a request_id got another job, or was not marked deduplicated.
- `duplicate_job`: two jobs for one logical job that carried a request_id.
- `lost_result`: a job FAILED with WORKER_LOST / LEASE_EXPIRED although its handler finished
  that attempt, and the worker process was neither killed nor stopped meanwhile;
  `result_discarded`: the same for an attempt that was then run again;
  `healthy_requeued`: an attempt requeued so while its handler was still running fine
  (it finished later) on a worker neither killed nor stopped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2

from bench.chaos.traffic import Observer, PlannedJob, Watch

TERMINAL_STATES = ("succeeded", "failed", "canceled")
LOST_CODES = ("WORKER_LOST", "LEASE_EXPIRED")
#: a watcher's stream should end this soon after the terminal event
WATCH_END_SLACK_S = 3.0
#: slack when matching a worker fault's time window with an attempt's
TIME_SLACK_S = 0.5
EXAMPLES = 5


@dataclass
class Evidence:
    """Everything the checks read, gathered after the run settled."""

    t0: float
    jobs: list[Any]
    events: list[Any]
    planned: list[PlannedJob]
    watches: list[Watch]
    observer: Observer
    calls: Any
    dedupe: list[Any]
    marks: dict[tuple[str, int], tuple[str, float]]
    worker_faults: list[tuple[str, str, float, float]]


def read_marks(marks_dir: Path, t0: float) -> dict[tuple[str, int], tuple[str, float]]:
    """(job id, attempt) → (instance, run time) of every attempt whose handler finished."""
    marks: dict[tuple[str, int], tuple[str, float]] = {}
    for path in sorted(marks_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue  # a line cut short by a SIGKILL
            marks[(m["job"], int(m["attempt"]))] = (m["instance"], m["t"] - t0)
    return marks


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _struct_dict(value: Any) -> str:
    """A result as the API shows it (numbers as floats), for comparing with observations."""
    if value is None:
        return json.dumps(None)
    s = struct_pb2.Struct()
    s.update(value)
    return json.dumps(json_format.MessageToDict(s), sort_keys=True)


class Checker:
    """Runs every check over the evidence; `violations[kind]` lists examples."""

    def __init__(self, ev: Evidence) -> None:
        self.ev = ev
        self.violations: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.info: Counter[str] = Counter()
        self.by_job: dict[str, list[Any]] = defaultdict(list)
        for e in ev.events:
            self.by_job[e["job_id"]].append(e)
        self.jobs = {j["id"]: j for j in ev.jobs}

    def add(self, kind: str, **example: Any) -> None:
        self.violations[kind].append(example)

    def run(self) -> None:
        self.check_submitted()
        for job in self.ev.jobs:
            self.check_job(job, self.by_job.get(job["id"], []))
        self.check_watchers()
        self.check_observations()
        self.check_calls()

    # -- submissions -------------------------------------------------------------
    def check_submitted(self) -> None:
        for p in self.ev.planned:
            for job_id in p.ids:
                if job_id not in self.jobs:
                    self.add("lost_job", job=job_id, n=p.n)
        per_n = Counter(j["n"] for j in self.ev.jobs)
        with_request_id = {str(p.n) for p in self.ev.planned if p.request_id}
        for n, count in per_n.items():
            if count > 1:
                self.info["logical jobs with several rows"] += 1
                if n in with_request_id:
                    self.add("duplicate_job", n=n, rows=count)
        for d in self.ev.dedupe:
            if d.second_id != d.first_id or not d.deduplicated:
                self.add(
                    "dedupe",
                    n=d.n,
                    first=d.first_id,
                    second=d.second_id,
                    deduplicated=d.deduplicated,
                )

    # -- one job's history -------------------------------------------------------
    def check_job(self, job: Any, evs: list[Any]) -> None:
        job_id = job["id"]
        seqs = [e["seq"] for e in evs]
        if seqs != list(range(1, job["last_seq"] + 1)):
            self.add("seq_gap", job=job_id, last_seq=job["last_seq"], seqs=_ranges(seqs))
        self.info["ignored events"] += sum(1 for e in evs if e["kind"] == "ignored")
        if job["state"] not in TERMINAL_STATES:
            self.add(
                "stuck",
                job=job_id,
                state=job["state"],
                attempt=job["attempt"],
                worker=job["worker_id"],
                last_events=_tail(evs),
            )
        else:
            terminal = [e for e in evs if e["kind"] == "state" and e["state"] in TERMINAL_STATES]
            later = [
                e
                for e in evs
                if terminal and e["kind"] == "state" and e["seq"] > terminal[0]["seq"]
            ]
            if len(terminal) != 1 or later:
                self.add(
                    "terminal_count",
                    job=job_id,
                    terminal=[(e["seq"], e["state"]) for e in terminal],
                    state_events_after=[(e["seq"], e["state"]) for e in later],
                )
            elif terminal[0]["state"] != job["state"]:
                self.add(
                    "terminal_changed",
                    job=job_id,
                    via="db",
                    event=terminal[0]["state"],
                    row=job["state"],
                )
        attempts = self.check_fencing(job, evs)
        self.check_results(job, attempts)

    def check_fencing(self, job: Any, evs: list[Any]) -> dict[int, dict[str, Any]]:
        """Walk the history; return each attempt's worker, start, end, end state and code."""
        job_id = job["id"]
        attempts: dict[int, dict[str, Any]] = {}
        current: tuple[int, str] | None = None
        for e in evs:
            t = e["t"] - self.ev.t0
            if e["kind"] == "state" and e["state"] == "running":
                current = (e["attempt"], e["worker_id"])
                attempts[e["attempt"]] = {"worker": e["worker_id"], "start": t}
            elif e["kind"] == "state" and e["seq"] > 1:
                if current is not None:
                    code = (_json(e["error"]) or {}).get("code")
                    attempts[current[0]].update(end=t, end_state=e["state"], code=code)
                if e["state"] == "succeeded" and (
                    current is None or (e["attempt"], e["worker_id"]) != current
                ):
                    self.add(
                        "fencing",
                        job=job_id,
                        what="succeeded event of a stale attempt",
                        event=(e["seq"], e["attempt"], e["worker_id"]),
                        running=current,
                    )
                current = None
            elif e["kind"] == "progress":
                stage = (_json(e["progress"]) or {}).get("stage", "")
                if current is None or stage != f"a{current[0]}" or e["attempt"] != current[0]:
                    self.add(
                        "fencing",
                        job=job_id,
                        what="progress of a stale attempt recorded",
                        event=(e["seq"], e["attempt"], stage),
                        running=current,
                    )
        if job["state"] == "succeeded":
            result = _json(job["result"]) or {}
            got = (result.get("job"), result.get("attempt"), result.get("worker"))
            want = (job_id, job["attempt"], job["worker_id"])
            if got != want:
                self.add(
                    "fencing",
                    job=job_id,
                    what="result of another attempt or worker",
                    result=got,
                    row=want,
                )
        return attempts

    def check_results(self, job: Any, attempts: dict[int, dict[str, Any]]) -> None:
        """Attempts whose handler finished but whose result was dropped (lost results)."""
        job_id = job["id"]
        for n, a in sorted(attempts.items()):
            if a.get("code") not in LOST_CODES:
                continue
            end = a.get("end", 0.0)
            mark = self.ev.marks.get((job_id, n))
            if mark is None:
                fault = self._worker_fault(a["worker"] + "#", a["start"], end)
                key = "by a worker fault" if fault else "with no worker fault"
                self.info[f"attempts requeued {a['code']} unfinished, {key}"] += 1
                continue
            instance, finished_at = mark
            final = job["state"] == "failed" and job["attempt"] == n
            if final and a["code"] == "WORKER_LOST":
                self.info["FAILED WORKER_LOST after the handler finished"] += 1
            excuse = self._worker_fault(instance, a["start"], end)
            if excuse:
                self.info[f"results lost to a worker {excuse} (expected)"] += 1
                continue
            example = {
                "job": job_id,
                "attempt": n,
                "instance": instance,
                "handler_finished_at": round(finished_at, 2),
                "ended": f"{a.get('end_state')} {a['code']} at {end:.2f}s",
                "ended_at": round(end, 2),
                "job_state": job["state"],
            }
            if finished_at > end + TIME_SLACK_S:
                # Not a result lost but healthy work taken away: the attempt was judged
                # lost while its handler still ran on a worker nobody killed or stopped.
                self.add("healthy_requeued", **example)
            else:
                self.add("lost_result" if final else "result_discarded", **example)

    def _worker_fault(self, instance: str, start: float, end: float) -> str:
        """The kind of fault (kill, stop) `instance` got while the attempt ran, or "".

        An `instance` ending in "#" matches every instance of that worker."""
        for inst, kind, f_start, f_end in self.ev.worker_faults:
            same = inst.startswith(instance) if instance.endswith("#") else inst == instance
            if same and f_start <= end + TIME_SLACK_S and f_end >= start - TIME_SLACK_S:
                return kind
        return ""

    # -- watchers ----------------------------------------------------------------
    def check_watchers(self) -> None:
        for w in self.ev.watches:
            job = self.jobs.get(w.job_id)
            evs = self.by_job.get(w.job_id, [])
            terminal = [
                e["seq"] for e in evs if e["kind"] == "state" and e["state"] in TERMINAL_STATES
            ]
            seqs = [s for s, *_ in w.events]
            if len(seqs) != len(set(seqs)):
                dups = sorted(s for s, c in Counter(seqs).items() if c > 1)
                self.add("watch_duplicate", job=w.job_id, duplicated=dups[:10])
            elif seqs != list(range(1, len(seqs) + 1)):
                self.add("watch_gap", job=w.job_id, seqs=_ranges(seqs), resumes=w.resumes)
            if job is None or job["state"] not in TERMINAL_STATES:
                continue  # reported as stuck / lost
            if w.terminal_at is None:
                self.add(
                    "watch_no_terminal",
                    job=w.job_id,
                    last_seq=w.last_seq,
                    terminal_seq=terminal[:1],
                    gave_up=w.gave_up,
                    errors=dict(w.errors),
                )
                continue
            if w.after_terminal or (terminal and w.last_seq != terminal[0]):
                self.add(
                    "watch_past_terminal",
                    job=w.job_id,
                    terminal_seq=terminal[:1],
                    after=w.after_terminal[:10],
                    last_seq=job["last_seq"],
                )
            if w.ended_at is None:
                self.add("watch_not_ended", job=w.job_id, terminal_at=round(w.terminal_at, 2))
            elif w.ended_at - w.terminal_at > WATCH_END_SLACK_S:
                self.add(
                    "watch_slow_end",
                    job=w.job_id,
                    ended_s_after_terminal=round(w.ended_at - w.terminal_at, 2),
                )

    # -- observations and calls --------------------------------------------------
    def check_observations(self) -> None:
        obs = self.ev.observer
        for c in obs.changes:
            self.add(
                "terminal_changed",
                job=c.job_id,
                via=c.via,
                at=round(c.t, 2),
                first=_diff(c.first, c.later),
                later=_diff(c.later, c.first),
            )
        for job_id, first in obs.first.items():
            row = self.jobs.get(job_id)
            if row is None:
                continue
            error = _json(row["error"]) or {}
            now = {
                "state": row["state"],
                "attempt": row["attempt"],
                "result": _struct_dict(_json(row["result"])),
                "error": error.get("code", ""),
                "worker_id": row["worker_id"] or "",
            }
            seen = {k: first[k] for k in now}
            if now != seen:
                self.add(
                    "terminal_changed",
                    job=job_id,
                    via="db (final row)",
                    first=_diff(seen, now),
                    later=_diff(now, seen),
                )

    def check_calls(self) -> None:
        calls = self.ev.calls
        for entry in calls.bad:
            self.add("internal_status", **entry)
        for entry in calls.unexpected:
            self.add("unexpected_status", **entry)
        for entry in calls.gave_up:
            self.add("call_gave_up", **entry)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if b.get(k) != v}


def _tail(evs: list[Any], n: int = 4) -> list[tuple[Any, ...]]:
    return [(e["seq"], e["kind"], e["state"], e["attempt"], e["worker_id"]) for e in evs[-n:]]


def _ranges(seqs: list[int]) -> str:
    """1,2,3,5,6 → '1-3,5-6' (short evidence of a gap or disorder)."""
    if not seqs:
        return ""
    out, start, prev = [], seqs[0], seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = s
        prev = s
    out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)[:200]
