"""The job state machine, declared once, and the one builder that turns it into SQL.

Every transition of docs/control-plane.md's diagram is a `Transition` in
`TRANSITIONS`: where it starts (`from_states`), what it compare-and-sets
(`cas`), where it can go (`branches`, first match wins), what it writes
(`sets`), the event it appends and the channels it wakes. `build` makes one
statement of it that applies to **many jobs at once**, so no transition can
forget a piece:

- the rows: the given jobs (`inputs`: one array per column, `unnest`ed) or,
  for a reaper, the first rows matching `pick` (SKIP LOCKED, `LIMIT :batch`);
- a compare-and-set on state (and `cas`) of the row locked FOR UPDATE, so of
  two racing writers exactly one moves the job and the other gets nothing back;
- what every move to a state implies, derived here from the target state and
  never written twice: a terminal state stamps `finished_at` and drops the
  lease and deadline; a return to QUEUED starts the next attempt (attempt + 1,
  no worker, no progress, no lease);
- `last_seq + 1`, the `job_events` row with that seq (and an IGNORED event
  before it where a branch says so), and one NOTIFY per channel for the whole
  statement (the payload is a comma list of job ids, at most NOTIFY_IDS each).

The claim (QUEUED → RUNNING) is declared here too; its candidate search is
hand-written in control.store.dispatch, which takes its SET clause and its
event from `start_sql`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa

from control.schema import TERMINAL_STATES, job_events, jobs

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "canceled",
)
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)

EVENTS = "spool_events"
JOBS = "spool_jobs"
CANCEL = "spool_cancel"

#: job ids per NOTIFY payload (36 characters + a comma each: far below 8,000 bytes)
NOTIFY_IDS = 150

#: the one backoff: before attempt `a + 1`, min(max, base · 2^(a-1)) with a random
#: half dropped ('equal jitter'), so a burst of failures does not retry in lockstep
BACKOFF_MS_SQL = (
    "(least(CAST(:backoff_max_ms AS double precision),"
    " CAST(:backoff_base_ms AS double precision) * power(2, greatest(j.attempt - 1, 0)))"
    " * (0.5 + random() / 2))"
)

_NOW = "CAST(:now AS timestamptz)"

#: (column, SQL type) of the `jobs` row, typed so JSONB and timestamps decode
JOB_COLUMN_TYPES = {c.name: c.type for c in jobs.c}

#: a transition's row carries the STATE event it appended as `ev_<column>` columns
EVENT_PREFIX = "ev_"
EVENT_COLUMN_TYPES = {EVENT_PREFIX + c.name: c.type for c in job_events.c}


def event_of(row: Mapping[str, object]) -> dict[str, object]:
    """The STATE event a transition's row carries, as `job_events` reads it back."""
    return {c.name: row[EVENT_PREFIX + c.name] for c in job_events.c}


@dataclass(frozen=True)
class Branch:
    """One way a transition can end: the target state and when it applies."""

    to: str
    #: SQL over `j` (the locked row) and `t` (its input row); None: otherwise
    when: str | None = None
    #: an IGNORED event with this message is appended before the STATE event
    ignored: str | None = None


@dataclass(frozen=True)
class Transition:
    """One transition of the job state machine (see the module docstring)."""

    name: str
    from_states: tuple[str, ...]
    branches: tuple[Branch, ...]
    #: input columns beyond `id` (uuid): name -> SQL type ('jsonb' travels as text)
    inputs: Mapping[str, str] = field(default_factory=dict)
    #: a reaper: the rows matching this SQL over `j` (no inputs)
    pick: str | None = None
    #: the compare-and-set beyond the state, SQL over `j` and `t`
    cas: str = ""
    #: column -> SQL (over `j`, `t`), or {target state: SQL} (other targets keep the value)
    sets: Mapping[str, str | Mapping[str, str]] = field(default_factory=dict)
    #: job_events.kind of the event (the STATE event unless it stays in its state)
    event_kind: str = "state"
    #: SQL over `u` (the updated row, with `prev_worker` and the `in_*` inputs)
    event_message: str = "''"
    event_error: str = "CAST(NULL AS jsonb)"
    event_worker: str = "u.prev_worker"
    #: channels woken beyond spool_events (spool_jobs only for jobs now QUEUED)
    notify: tuple[str, ...] = ()
    #: the SQL of "now": the caller's clock (:now) or the database's
    now: str = _NOW
    #: RETURNING every jobs column (the API answers with the job)
    full_rows: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.to for b in self.branches))


#: the compare-and-set of every worker message: RUNNING this attempt on this worker
_WORKER_CAS = "j.attempt = t.attempt AND j.worker_id = t.worker_id"
_WORKER_INPUTS = {"attempt": "int", "worker_id": "text"}
_CANCEL_WINS = Branch(CANCELED, "j.cancel_requested")
#: a reaper: the attempt comes back while attempts are left, else it fails
_REAPED = (
    Branch(CANCELED, "j.cancel_requested"),
    Branch(QUEUED, "j.attempt < j.max_attempts"),
    Branch(FAILED),
)
_REAPER_SETS: dict[str, str | Mapping[str, str]] = {
    "not_before": {QUEUED: f"{_NOW} + {BACKOFF_MS_SQL} * interval '1 millisecond'"},
    "error": {QUEUED: "CAST(:error AS jsonb)", FAILED: "CAST(:error AS jsonb)"},
}


def _reaper(name: str, pick: str, message: str) -> Transition:
    """A reaper: the RUNNING rows matching `pick` come back (or fail), their holder is told."""
    return Transition(
        name,
        (RUNNING,),
        _REAPED,
        pick=pick,
        sets=_REAPER_SETS,
        event_message=f"'{message}'",
        event_error="u.error",
        notify=(CANCEL, JOBS),
    )


TRANSITIONS: dict[str, Transition] = {
    t.name: t
    for t in (
        Transition(
            "claim",
            (QUEUED,),
            (Branch(RUNNING),),
            sets={
                "worker_id": ":worker_id",
                "started_at": _NOW,
                "lease_expires_at": f"{_NOW} + :lease_ms * interval '1 millisecond'",
                "deadline_at": "CASE WHEN j.timeout_ms > 0 THEN "
                f"{_NOW} + least(j.timeout_ms, :max_timeout_ms) * interval '1 millisecond' END",
                "cancel_requested": "false",
                "cancel_requested_at": "NULL",
                "progress": "NULL",
            },
            event_worker="u.worker_id",
        ),
        Transition(
            "complete",
            (RUNNING,),
            (
                Branch(CANCELED, "j.cancel_requested", "completion after cancel request ignored"),
                Branch(SUCCEEDED),
            ),
            inputs={**_WORKER_INPUTS, "result": "jsonb", "outputs": "jsonb"},
            cas=_WORKER_CAS,
            sets={"result": {SUCCEEDED: "t.result"}, "outputs": {SUCCEEDED: "t.outputs"}},
        ),
        Transition(
            "fail",
            (RUNNING,),
            (
                _CANCEL_WINS,
                Branch(
                    QUEUED,
                    "t.retryable AND j.attempt < j.max_attempts",
                ),
                Branch(FAILED),
            ),
            inputs={**_WORKER_INPUTS, "retryable": "bool", "error": "jsonb", "delay_ms": "bigint"},
            cas=_WORKER_CAS,
            sets={
                "not_before": {
                    QUEUED: f"{_NOW} + coalesce(t.delay_ms, {BACKOFF_MS_SQL})"
                    " * interval '1 millisecond'"
                },
                "error": "t.error",
            },
            event_error="u.error",
            event_worker="u.in_worker_id",
            notify=(JOBS,),
        ),
        Transition(
            # A hand-back (drain) never spends the retry budget: max_attempts + 1.
            "release",
            (RUNNING,),
            (_CANCEL_WINS, Branch(QUEUED)),
            inputs={**_WORKER_INPUTS, "message": "text"},
            cas=_WORKER_CAS,
            sets={"max_attempts": {QUEUED: "j.max_attempts + 1"}, "not_before": {QUEUED: _NOW}},
            event_message="u.in_message",
            event_worker="u.in_worker_id",
            notify=(JOBS,),
        ),
        Transition(
            "confirm_canceled",
            (RUNNING,),
            (Branch(CANCELED),),
            inputs=_WORKER_INPUTS,
            cas=_WORKER_CAS + " AND j.cancel_requested",
        ),
        _reaper(
            "reap_lease",
            # A worker still marked connected through another replica is that replica's
            # to judge: if the replica died, its heartbeats could not land, so the lease
            # says nothing about the worker (it gets one more lease once marked stale).
            f"j.lease_expires_at < {_NOW} AND NOT EXISTS (SELECT 1 FROM workers w"
            " WHERE w.id = j.worker_id AND w.connected"
            " AND w.control_replica IS DISTINCT FROM :replica)",
            "lease expired",
        ),
        _reaper("reap_deadline", f"j.deadline_at <= {_NOW}", "timeout"),
        _reaper(
            "requeue_lost",
            "j.worker_id = :worker_id AND (j.id, j.attempt) NOT IN ("
            "SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])))",
            "worker lost the attempt",
        ),
        Transition(
            "force_cancel",
            (RUNNING,),
            (Branch(CANCELED),),
            pick="j.cancel_requested AND j.cancel_requested_at <= "
            f"{_NOW} - :grace_ms * interval '1 millisecond'",
            event_message="'cancel grace period over'",
            notify=(CANCEL,),
        ),
        Transition(
            # A QUEUED job no claim can start (a stored value breaks it); its time
            # columns are reset to values any reader can decode.
            "quarantine",
            (QUEUED,),
            (Branch(FAILED),),
            inputs={"error": "jsonb"},
            sets={"error": "t.error", "not_before": _NOW, "timeout_ms": "0"},
            event_error="u.error",
        ),
        Transition(
            "cancel_queued",
            (QUEUED,),
            (Branch(CANCELED),),
            inputs={"tenant": "text", "attempt": "int", "message": "text"},
            cas="j.tenant = t.tenant AND j.attempt = t.attempt",
            event_message="u.in_message",
            now="now()",
            full_rows=True,
        ),
        Transition(
            # The worker hears of it on spool_cancel; CANCELED follows from it.
            "request_cancel",
            (RUNNING,),
            (Branch(RUNNING),),
            inputs={"tenant": "text", "attempt": "int", "message": "text"},
            cas="j.tenant = t.tenant AND j.attempt = t.attempt AND NOT j.cancel_requested",
            sets={"cancel_requested": "true", "cancel_requested_at": "now()"},
            event_kind="cancel_requested",
            event_message="u.in_message",
            event_worker="u.worker_id",
            notify=(CANCEL,),
            now="now()",
            full_rows=True,
        ),
        Transition(
            # A fresh budget B: the attempts the job had since its budget started
            # (the attempt of the latest Retry event, else 1); attempt + 1 and
            # max_attempts = attempt + B, so dispatch grants B more attempts.
            "retry",
            (FAILED, CANCELED),
            (Branch(QUEUED),),
            inputs={"tenant": "text", "message": "text"},
            cas="j.tenant = t.tenant",
            sets={
                "max_attempts": "j.attempt + greatest(j.max_attempts - coalesce(("
                "SELECT max(e.attempt) FROM job_events AS e WHERE e.job_id = j.id"
                " AND e.kind = 'state' AND e.state = 'queued' AND e.message = t.message), 1)"
                " + 1, 1)",
                "not_before": "now()",
                "cancel_requested": "false",
                "cancel_requested_at": "NULL",
                "result": "NULL",
                "error": "NULL",
                "started_at": "NULL",
            },
            event_message="u.in_message",
            event_worker="NULL",
            notify=(JOBS,),
            now="now()",
            full_rows=True,
        ),
    )
}


# ---------------------------------------------------------------- the builder


def implied_sets(t: Transition, now: str) -> dict[str, dict[str, str]]:
    """What every move to a state writes, by target state (the part no transition repeats)."""
    out: dict[str, dict[str, str]] = {}
    for to in t.targets:
        s: dict[str, str] = {}
        if to in TERMINAL_STATES:
            s.update(finished_at=now, lease_expires_at="NULL", deadline_at="NULL")
        elif to == QUEUED:
            s.update(
                attempt="j.attempt + 1",
                worker_id="NULL",
                progress="NULL",
                finished_at="NULL",
                lease_expires_at="NULL",
                deadline_at="NULL",
            )
        out[to] = s
    return out


def _set_clause(t: Transition, old: str = "t") -> str:
    """`col = expr` for every column the transition writes (per target where they differ).

    `old` names the locked row's CTE in the UPDATE: it carries `next_state`,
    `prev_worker` and the input columns, so the expressions may say `t.<input>`.
    """
    by_col: dict[str, dict[str, str]] = {}
    for to, sets in implied_sets(t, t.now).items():
        for col, expr in sets.items():
            by_col.setdefault(col, {})[to] = expr
    for col, spec in t.sets.items():
        if isinstance(spec, str):
            by_col[col] = dict.fromkeys(t.targets, spec)
        else:
            by_col.setdefault(col, {}).update(spec)
    single = len(t.targets) == 1
    lines = [f"state = '{t.targets[0]}'" if single else f"state = {old}.next_state"]
    for col, per in by_col.items():
        exprs = set(per.values())
        if single or (len(exprs) == 1 and set(per) == set(t.targets)):
            lines.append(f"{col} = {next(iter(exprs))}")
        else:
            cases = " ".join(f"WHEN '{to}' THEN {e}" for to, e in per.items())
            lines.append(f"{col} = CASE {old}.next_state {cases} ELSE j.{col} END")
    bump = "1"
    ignored = [b.to for b in t.branches if b.ignored]
    if ignored:
        states = ", ".join(f"'{s}'" for s in ignored)
        bump = f"CASE WHEN {old}.next_state IN ({states}) THEN 2 ELSE 1 END"
    lines += [f"updated_at = {t.now}", f"last_seq = j.last_seq + {bump}"]
    return ",\n            ".join(lines)


def _next_state(t: Transition) -> str:
    cases = " ".join(f"WHEN {b.when} THEN '{b.to}'" for b in t.branches if b.when is not None)
    otherwise = next((f"'{b.to}'" for b in t.branches if b.when is None), "NULL")
    return f"CASE {cases} ELSE {otherwise} END" if cases else otherwise


def _locked(t: Transition) -> tuple[str, str]:
    """The input CTE (`t`, one row per given job) and the SELECT of the locked rows."""
    states = ", ".join(f"'{s}'" for s in t.from_states)
    head = f"SELECT j.id, j.worker_id AS prev_worker, {_next_state(t)} AS next_state"
    if t.pick is not None:
        return "", (
            f"{head}\n        FROM jobs AS j WHERE j.state IN ({states}) AND ({t.pick})"
            "\n        ORDER BY j.id LIMIT :batch FOR UPDATE OF j SKIP LOCKED"
        )
    cols = {"id": "uuid", **t.inputs}
    arrays = ", ".join(
        f"CAST(:{c} AS {'text' if ty == 'jsonb' else ty}[])" for c, ty in cols.items()
    )
    picks = ", ".join(f"CAST(x.{c} AS jsonb) AS {c}" if ty == "jsonb" else f"x.{c}"
                      for c, ty in cols.items())  # fmt: skip
    inputs = "".join(f", t.{c}" for c in t.inputs)
    cas = f" AND {t.cas}" if t.cas else ""
    return (
        f"t AS (SELECT {picks} FROM unnest({arrays}) AS x({', '.join(cols)})),\n    ",
        f"{head}{inputs}\n        FROM jobs AS j JOIN t ON j.id = t.id"
        f"\n        WHERE j.state IN ({states}){cas}\n        ORDER BY j.id FOR UPDATE OF j",
    )


def _events(t: Transition) -> str:
    cols = "job_id, seq, kind, state, attempt, error, worker_id, message, created_at"
    rows = [
        f"SELECT u.id, u.last_seq, '{t.event_kind}', u.state, u.attempt, {t.event_error},"
        f" {t.event_worker}, {t.event_message}, {t.now} FROM u"
    ]
    for b in t.branches:
        if b.ignored:
            rows.insert(
                0,
                "SELECT u.id, u.last_seq - 1, 'ignored', NULL, u.attempt, CAST(NULL AS jsonb),"
                f" {t.event_worker}, '{b.ignored}', {t.now} FROM u WHERE u.state = '{b.to}'",
            )
    return f"INSERT INTO job_events ({cols})\n        " + "\n        UNION ALL ".join(rows)


def notify_sql(channel: str, rows: str, *, where: str = "", key: str = "id::text") -> str:
    """One NOTIFY per NOTIFY_IDS rows of `rows` (payload: their keys, comma-separated)."""
    cond = f" WHERE {where}" if where else ""
    return (
        f"SELECT pg_notify('{channel}', string_agg(k, ',')) FROM ("
        f"SELECT {key} AS k, (row_number() OVER () - 1) / {NOTIFY_IDS} AS g"
        f" FROM {rows}{cond}) AS p GROUP BY g"
    )


def _notes(t: Transition, rows: str = "u") -> str:
    notes = [notify_sql(EVENTS, rows)]
    for channel in t.notify:
        if channel == JOBS:
            # Identical payloads of one transaction are delivered once: one per type.
            notes.append(
                f"SELECT pg_notify('{JOBS}', type) FROM {rows}"
                f" WHERE state = '{QUEUED}' GROUP BY type"
            )
        else:
            notes.append(notify_sql(channel, rows))
    return "\n        UNION ALL ".join(notes)


def build(t: Transition) -> sa.TextClause:
    """The one statement of transition `t` (see the module docstring)."""
    source, locked = _locked(t)
    returning = "j.*" if t.full_rows else "j.id, j.type, j.state, j.attempt, j.error, j.last_seq"
    # The inputs come back for the events and to match rows to inputs; not the JSON
    # ones (nothing needs them, and decoding them is work).
    returning += ", t.prev_worker" + "".join(
        f", t.{c} AS in_{c}" for c, ty in t.inputs.items() if ty != "jsonb"
    )
    sql = f"""
    WITH {source}old AS (
        {locked}
    ),
    u AS (
        UPDATE jobs AS j SET
            {_set_clause(t)}
        FROM old AS t WHERE j.id = t.id
        RETURNING {returning}
    ),
    events AS (
        {_events(t)}
        RETURNING *
    ),
    notes AS (
        {_notes(t)}
    )
    SELECT u.*, (SELECT count(*) FROM notes) AS notified, {_event_columns("e")}
    FROM u LEFT JOIN events AS e ON e.job_id = u.id AND e.seq = u.last_seq
    """
    # The event comes back so the replica that committed it can hand it to its own
    # watchers at once (control.services.feeds) instead of reading it back.
    types = JOB_COLUMN_TYPES if t.full_rows else {}
    return sa.text(sql).columns(**types, **EVENT_COLUMN_TYPES)


def _event_columns(alias: str) -> str:
    return ", ".join(f"{alias}.{c.name} AS {EVENT_PREFIX}{c.name}" for c in job_events.c)


#: every transition's statement, built once at import
STATEMENTS: dict[str, sa.TextClause] = {
    name: build(t) for name, t in TRANSITIONS.items() if name != "claim"
}


def start_sql() -> tuple[str, str, str]:
    """The claim's pieces for control.store.dispatch: SET clause (over `j`), the event
    rows' SELECT list and the notifications (both over `started`)."""
    t = TRANSITIONS["claim"]
    event = f"id, last_seq, 'state', '{RUNNING}', attempt, worker_id, {t.now}"
    return _set_clause(t), event, _notes(t, "started")


def edges() -> set[tuple[str, str, str]]:
    """(transition, from, to) of every edge: the table in docs/control-plane.md must match."""
    return {(t.name, f, b.to) for t in TRANSITIONS.values() for f in t.from_states
            for b in t.branches}  # fmt: skip
