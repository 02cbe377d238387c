"""A job's events go with it through a trigger, not a foreign key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 10:40:00.000000

Every transition appends a `job_events` row, and the foreign key checked each
one against `jobs` (a lookup and a row lock per event, about a sixth of the
event's cost). Nothing needs that check: every statement that appends an event
updates or inserts the job's row in the same statement, so the job exists and
is locked. What the key also did, deleting a job's events with the job, is now a
statement-level trigger on `jobs` (one DELETE per statement, by the primary key).
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("fk_job_events_job_id_jobs", "job_events", type_="foreignkey")
    op.execute(
        "CREATE FUNCTION spool_delete_job_events() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN DELETE FROM job_events WHERE job_id IN (SELECT id FROM old_rows); "
        "RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER delete_job_events AFTER DELETE ON jobs "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION spool_delete_job_events()"
    )
    # Events a deleted job left behind cannot exist yet (the key prevented them).


def downgrade() -> None:
    op.execute("DROP TRIGGER delete_job_events ON jobs")
    op.execute("DROP FUNCTION spool_delete_job_events()")
    op.execute(
        "DELETE FROM job_events AS e"
        " WHERE NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.id = e.job_id)"
    )
    op.create_foreign_key(
        "fk_job_events_job_id_jobs", "job_events", "jobs", ["job_id"], ["id"], ondelete="CASCADE"
    )
