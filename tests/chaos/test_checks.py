"""The chaos checks catch what they claim to: each violation kind from a hand-made history.

The chaos run itself (test_chaos.py) passing proves nothing unless every check can
fail; these feed the checker evidence with one defect each (and a clean control).
"""

from __future__ import annotations

import json
import random
from typing import Any

import grpc

from bench.chaos import faults
from bench.chaos.checks import Checker, Evidence
from bench.chaos.traffic import CallLog, Clock, Observer, PlannedJob, Watch, terminal_snapshot
from spool.v1 import job_pb2

T0 = 1_000_000.0
JOB = "00000000-0000-0000-0000-00000000000a"
STATE, PROGRESS = job_pb2.JOB_EVENT_KIND_STATE, job_pb2.JOB_EVENT_KIND_PROGRESS


def event(
    seq: int, kind: str, state: str | None, attempt: int, worker: str | None, t: float, **extra: Any
) -> dict[str, Any]:
    row = {
        "job_id": JOB,
        "seq": seq,
        "kind": kind,
        "state": state,
        "attempt": attempt,
        "worker_id": worker,
        "error": None,
        "progress": None,
        "message": "",
        "t": T0 + t,
    }
    row.update(extra)
    return row


def clean_history() -> list[dict[str, Any]]:
    """Queued, run by w0 (attempt 1) with progress, succeeded."""
    return [
        event(1, "state", "queued", 1, None, 0.0),
        event(2, "state", "running", 1, "w0", 1.0),
        event(3, "progress", None, 1, "w0", 1.5, progress=json.dumps({"stage": "a1"})),
        event(4, "state", "succeeded", 1, "w0", 2.0),
    ]


def job_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "id": JOB,
        "state": "succeeded",
        "attempt": 1,
        "max_attempts": 5,
        "result": json.dumps({"job": JOB, "attempt": 1, "worker": "w0", "n": 0}),
        "error": None,
        "worker_id": "w0",
        "last_seq": 4,
        "request_id": None,
        "n": "0",
    }
    row.update(overrides)
    return row


def check(
    jobs: list[dict[str, Any]] | None = None, events: list[dict[str, Any]] | None = None, **kw: Any
) -> Checker:
    clock = Clock()
    clock.t0 = T0
    planned = PlannedJob(n=0, params={}, max_attempts=5, priority=0, ids=[JOB])
    ev = Evidence(
        t0=T0,
        jobs=[job_row()] if jobs is None else jobs,
        events=clean_history() if events is None else events,
        planned=kw.pop("planned", [planned]),
        watches=kw.pop("watches", []),
        observer=kw.pop("observer", Observer(None, clock, random.Random(0), 1.0)),  # type: ignore[arg-type]
        calls=kw.pop("calls", CallLog(clock)),
        dedupe=kw.pop("dedupe", []),
        marks=kw.pop("marks", {}),
        worker_faults=kw.pop("worker_faults", []),
    )
    checker = Checker(ev)
    checker.run()
    return checker


def kinds(checker: Checker) -> set[str]:
    return set(checker.violations)


def test_a_clean_history_has_no_violation() -> None:
    assert kinds(check()) == set()


def test_a_job_never_stored_is_lost_and_a_running_one_is_stuck() -> None:
    assert kinds(check(jobs=[], events=[])) == {"lost_job"}
    running = clean_history()[:3]
    stuck = check(jobs=[job_row(state="running", last_seq=3, result=None)], events=running)
    assert kinds(stuck) == {"stuck"}


def test_a_seq_gap_and_a_second_terminal_event_are_caught() -> None:
    gap = clean_history()
    gap[3]["seq"] = 5
    assert "seq_gap" in kinds(check(jobs=[job_row(last_seq=5)], events=gap))
    twice = [*clean_history(), event(5, "state", "failed", 1, "w0", 3.0)]
    assert "terminal_count" in kinds(check(jobs=[job_row(last_seq=5)], events=twice))


def test_fencing_catches_a_stale_completion_result_and_progress() -> None:
    # Attempt 1 (w0) was requeued; attempt 2 runs on w1; w0's completion was applied.
    evs = [
        event(1, "state", "queued", 1, None, 0.0),
        event(2, "state", "running", 1, "w0", 1.0),
        event(3, "state", "queued", 2, "w0", 4.0, error=json.dumps({"code": "LEASE_EXPIRED"})),
        event(4, "state", "running", 2, "w1", 4.5),
        event(5, "progress", None, 2, "w1", 5.0, progress=json.dumps({"stage": "a1"})),
        event(6, "state", "succeeded", 2, "w0", 6.0),
    ]
    stale = job_row(attempt=2, last_seq=6, worker_id="w1")  # result still names attempt 1 / w0
    found = [v["what"] for v in check(jobs=[stale], events=evs).violations["fencing"]]
    assert found == [
        "progress of a stale attempt recorded",
        "succeeded event of a stale attempt",
        "result of another attempt or worker",
    ]


def test_a_finished_attempt_requeued_worker_lost_is_a_lost_result_unless_its_worker_died() -> None:
    evs = [
        event(1, "state", "queued", 1, None, 0.0),
        event(2, "state", "running", 1, "w0", 1.0),
        event(3, "state", "failed", 1, "w0", 3.0, error=json.dumps({"code": "WORKER_LOST"})),
    ]
    failed = job_row(
        state="failed", last_seq=3, result=None, error=json.dumps({"code": "WORKER_LOST"})
    )
    marks = {(JOB, 1): ("w0#1", 2.0)}
    assert kinds(check(jobs=[failed], events=evs, marks=marks)) == {"lost_result"}
    killed = check(
        jobs=[failed], events=evs, marks=marks, worker_faults=[("w0#1", "kill", 2.5, 2.6)]
    )
    assert kinds(killed) == set()
    assert killed.info["results lost to a worker kill (expected)"] == 1
    # The handler finished only after its attempt was taken away: healthy work requeued.
    late = {(JOB, 1): ("w0#1", 5.0)}
    assert kinds(check(jobs=[failed], events=evs, marks=late)) == {"healthy_requeued"}


def watch(
    seqs: list[int],
    terminal_at: float | None = 2.0,
    ended_at: float | None = 2.1,
    after: list[int] | None = None,
) -> Watch:
    w = Watch(
        JOB,
        events=[(s, STATE, 0, 1.0) for s in seqs],
        terminal_at=terminal_at,
        ended_at=ended_at,
        after_terminal=after or [],
    )
    return w


def test_watchers_gap_duplicate_past_terminal_and_late_end_are_caught() -> None:
    assert kinds(check(watches=[watch([1, 2, 3, 4])])) == set()
    assert kinds(check(watches=[watch([1, 2, 4])])) == {"watch_gap"}
    assert kinds(check(watches=[watch([1, 2, 2, 3, 4])])) == {"watch_duplicate"}
    past = watch([1, 2, 3, 4, 5], after=[5])
    assert kinds(check(watches=[past])) == {"watch_past_terminal"}
    assert kinds(check(watches=[watch([1, 2, 3, 4], ended_at=9.0)])) == {"watch_slow_end"}
    assert kinds(check(watches=[watch([1, 2, 3, 4], ended_at=None)])) == {"watch_not_ended"}
    assert kinds(check(watches=[watch([1, 2], terminal_at=None)])) == {"watch_no_terminal"}


def test_a_terminal_job_seen_changing_is_caught() -> None:
    clock = Clock()
    observer = Observer(None, clock, random.Random(0), 1.0)  # type: ignore[arg-type]
    job = job_pb2.Job(id=JOB, state=job_pb2.JOB_STATE_SUCCEEDED, attempt=1, worker_id="w0")
    job.result.update({"job": JOB, "attempt": 1, "worker": "w0", "n": 0})
    observer.see(job, "List")
    assert kinds(check(observer=observer)) == set()
    changed = job_pb2.Job()
    changed.CopyFrom(job)
    changed.state = job_pb2.JOB_STATE_FAILED
    observer.see(changed, "Get")
    assert kinds(check(observer=observer)) == {"terminal_changed"}
    assert terminal_snapshot(changed)["state"] == "failed"


def test_internal_and_unknown_are_violations_unavailable_is_not() -> None:
    calls = CallLog(Clock())
    calls.record("Get", grpc.StatusCode.UNAVAILABLE, "db down")
    calls.record("Get", grpc.StatusCode.OK)
    assert kinds(check(calls=calls)) == set()
    calls.record("List", grpc.StatusCode.INTERNAL, "internal error")
    calls.record("Submit", grpc.StatusCode.UNKNOWN, "DecodeError")
    calls.record("Cancel", grpc.StatusCode.FAILED_PRECONDITION, "?")
    found = check(calls=calls)
    assert kinds(found) == {"internal_status", "unexpected_status"}
    assert len(found.violations["internal_status"]) == 2


def test_the_fault_plan_is_seeded_has_every_kind_and_is_bounded() -> None:
    def plan(seed: int, window_s: float = 10.0, **kw: Any) -> list[Any]:
        args = {"workers": 4, "replicas": 2, "pg_restarts": True, "max_faults": 50, **kw}
        return faults.plan_faults(random.Random(seed), window_s, **args)

    assert plan(3) == plan(3) and plan(3) != plan(4)
    for seed in range(20):  # even a window too short for all of them gets each kind once
        assert {f.kind for f in plan(seed, 5.0)} == set(faults.KINDS)
    assert "pg_restart" not in {f.kind for f in plan(1, 60.0, pg_restarts=False)}
    assert len(plan(1, 600.0, max_faults=9)) == 9
