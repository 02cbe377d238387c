"""The state machine: its declaration against the docs, its statements against Postgres."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from control.schema import TERMINAL_STATES
from control.store import machine

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-plane.md"


def documented_edges() -> set[tuple[str, str, str]]:
    """(transition, from, to) of the transitions table in docs/control-plane.md."""
    text = DOC.read_text()
    table = text[text.index("| transition | from | to |") :].split("\n\n")[0]
    edges = set()
    for line in table.splitlines()[2:]:
        name, froms, tos = (c.strip() for c in line.strip("|").split("|")[:3])
        for f in froms.split(","):
            for t in tos.split(","):
                edges.add((name, f.strip().lower(), t.strip().lower()))
    return edges


def test_the_table_in_the_docs_is_the_declared_machine():
    assert documented_edges() == machine.edges()


def test_every_state_is_reachable_and_terminal_states_only_leave_by_retry():
    edges = machine.edges()
    assert {to for _, _, to in edges} | {machine.QUEUED} == set(machine.STATES)
    leaving_terminal = {name for name, f, _ in edges if f in TERMINAL_STATES}
    assert leaving_terminal == {"retry"}


def test_a_requested_cancel_wins_wherever_a_running_attempt_ends():
    for t in machine.TRANSITIONS.values():
        if t.from_states != (machine.RUNNING,) or t.targets == (machine.RUNNING,):
            continue
        first = t.branches[0]
        assert first.to == machine.CANCELED, t.name
        assert first.when is None or "cancel_requested" in first.when, t.name


def test_every_statement_bumps_the_seq_appends_an_event_and_notifies():
    for name, statement in machine.STATEMENTS.items():
        sql = statement.element.text if hasattr(statement, "element") else statement.text
        assert "last_seq = j.last_seq +" in sql, name
        assert "INSERT INTO job_events" in sql, name
        assert f"pg_notify('{machine.EVENTS}'" in sql, name
        assert "FOR UPDATE OF j" in sql, name


def test_moves_to_a_state_write_what_the_state_implies():
    done = machine.TRANSITIONS["complete"]
    sql = machine.STATEMENTS["complete"].element.text
    assert set(machine.implied_sets(done, "now()")) == {machine.SUCCEEDED, machine.CANCELED}
    assert "finished_at = " in sql and "lease_expires_at = NULL" in sql
    requeue = machine.STATEMENTS["reap_lease"].element.text
    assert re.search(r"attempt = CASE t\.next_state WHEN 'queued' THEN j\.attempt \+ 1", requeue)


async def test_one_statement_moves_many_jobs_and_refuses_the_stale_ones(db):
    """complete on three running attempts of which one is stale: two move, one does not."""
    now = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(3)]
    async with db.session() as s, s.begin():
        for i, job_id in enumerate(ids):
            await s.execute(
                sa.text(
                    "INSERT INTO jobs (id, tenant, type, state, attempt, max_attempts,"
                    " worker_id, last_seq) VALUES (:id, 't', 'x', 'running', :attempt, 3, 'w', 1)"
                ),
                {"id": job_id, "attempt": 2 if i == 2 else 1},
            )
    args = {
        "id": [str(i) for i in ids],
        "attempt": [1, 1, 1],
        "worker_id": ["w", "w", "w"],
        "result": ['{"n": 1}'] * 3,
        "outputs": ["[]"] * 3,
        "now": now,
    }
    async with db.session() as s, s.begin():
        moved = {r.id for r in await s.execute(machine.STATEMENTS["complete"], args)}
        rows = {
            r.id: r
            for r in await s.execute(
                sa.text("SELECT id, state, last_seq, result FROM jobs WHERE id = ANY(:ids)"),
                {"ids": ids},
            )
        }
        events = (
            await s.execute(
                sa.text("SELECT job_id, seq, state FROM job_events WHERE job_id = ANY(:ids)"),
                {"ids": ids},
            )
        ).all()
    assert moved == set(ids[:2])
    assert [rows[i].state for i in ids] == ["succeeded", "succeeded", "running"]
    assert rows[ids[0]].result == {"n": 1} and rows[ids[0]].last_seq == 2
    assert sorted((e.job_id, e.seq, e.state) for e in events) == sorted(
        (i, 2, "succeeded") for i in ids[:2]
    )
