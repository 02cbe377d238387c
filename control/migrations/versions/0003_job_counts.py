"""Terminal jobs counted incrementally, so GetStats does not scan the jobs table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 06:30:00.000000

- `job_count_deltas`: one signed row per (tenant, type, terminal state) that a
  statement on `jobs` changed, appended by statement-level triggers (transition
  tables): INSERT, UPDATE and DELETE. Appending never waits on another writer.
- `job_counts`: the folded totals (control.store.jobs.fold_job_counts moves the
  deltas in, one statement, now and then); a count is `job_counts` + deltas.
- Backfilled from the jobs already there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TERMINAL = "('succeeded', 'failed', 'canceled')"

#: the deltas of one statement: + for terminal rows after it, - for terminal rows before it
_FUNCTIONS = {
    "insert": f"""
        INSERT INTO job_count_deltas (tenant, type, state, n)
        SELECT tenant, type, state, count(*) FROM new_rows
        WHERE state IN {TERMINAL} GROUP BY tenant, type, state
    """,
    "update": f"""
        INSERT INTO job_count_deltas (tenant, type, state, n)
        SELECT tenant, type, state, sum(d) FROM (
            SELECT tenant, type, state, 1 AS d FROM new_rows WHERE state IN {TERMINAL}
            UNION ALL
            SELECT tenant, type, state, -1 AS d FROM old_rows WHERE state IN {TERMINAL}
        ) AS x GROUP BY tenant, type, state HAVING sum(d) <> 0
    """,
    "delete": f"""
        INSERT INTO job_count_deltas (tenant, type, state, n)
        SELECT tenant, type, state, -count(*) FROM old_rows
        WHERE state IN {TERMINAL} GROUP BY tenant, type, state
    """,
}
_REFERENCING = {
    "insert": "NEW TABLE AS new_rows",
    "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "OLD TABLE AS old_rows",
}


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("tenant", sa.Text(), primary_key=True),
        sa.Column("type", sa.Text(), primary_key=True),
        sa.Column("state", sa.Text(), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "job_count_deltas",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    for op_name, body in _FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION spool_count_jobs_{op_name}() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER count_jobs_{op_name} AFTER {op_name.upper()} ON jobs "
            f"REFERENCING {_REFERENCING[op_name]} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION spool_count_jobs_{op_name}()"
        )
    op.execute(
        f"""
        INSERT INTO job_counts (tenant, type, state, n)
        SELECT tenant, type, state, count(*) FROM jobs
        WHERE state IN {TERMINAL} GROUP BY tenant, type, state
        """
    )


def downgrade() -> None:
    for op_name in _FUNCTIONS:
        op.execute(f"DROP TRIGGER count_jobs_{op_name} ON jobs")
        op.execute(f"DROP FUNCTION spool_count_jobs_{op_name}()")
    op.drop_table("job_count_deltas")
    op.drop_table("job_counts")
