"""Table definitions: the one description of Spool's Postgres schema.

Alembic migrations under `control/migrations/` create exactly this; a test
checks the two agree. Times are `timestamptz`, durations are milliseconds.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATES = ("succeeded", "failed", "canceled")

_now = sa.text("now()")

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("inputs", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("outputs", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("worker_selector", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("concurrency_key", sa.Text, nullable=True),
    sa.Column("concurrency_limit", sa.Integer, nullable=False, server_default="0"),
    sa.Column("min_start_interval_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("not_before", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("timeout_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("progress", JSONB, nullable=True),
    sa.Column("result", JSONB, nullable=True),
    sa.Column("error", JSONB, nullable=True),
    sa.Column("worker_id", sa.Text, nullable=True),
    # Lease of the running attempt: extended by heartbeats, reaped when past.
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    # Deadline of the running attempt from timeout_ms.
    sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
    # When a RUNNING job's cancel was requested (the grace period counts from it).
    sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("request_id", sa.Text, nullable=True),
    # Hash of the submitted spec: same request_id + other payload -> ALREADY_EXISTS.
    sa.Column("spec_hash", sa.Text, nullable=True),
    # Sequence number of the latest job_events row.
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint(f"state IN {JOB_STATES!r}", name="state"),
    sa.CheckConstraint("priority BETWEEN -100 AND 100", name="priority"),
    sa.CheckConstraint("attempt >= 1", name="attempt"),
)

# Claim order for workers: only QUEUED rows, best priority then oldest.
sa.Index(
    "ix_jobs_claim",
    jobs.c.priority.desc(),
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=jobs.c.state == "queued",
)
# List newest first per tenant (keyset paging on created_at, id).
sa.Index("ix_jobs_tenant_created", jobs.c.tenant, jobs.c.created_at.desc(), jobs.c.id.desc())
# Idempotent submit.
sa.Index(
    "uq_jobs_tenant_request_id",
    jobs.c.tenant,
    jobs.c.request_id,
    unique=True,
    postgresql_where=jobs.c.request_id.isnot(None),
)
# Lease reaper and per-key running counts.
sa.Index(
    "ix_jobs_running_lease",
    jobs.c.lease_expires_at,
    postgresql_where=jobs.c.state == "running",
)
sa.Index(
    "ix_jobs_running_key",
    jobs.c.tenant,
    jobs.c.concurrency_key,
    postgresql_where=sa.and_(jobs.c.state == "running", jobs.c.concurrency_key.isnot(None)),
)
# Retention sweeper.
sa.Index(
    "ix_jobs_finished",
    jobs.c.finished_at,
    postgresql_where=jobs.c.state.in_(TERMINAL_STATES),
)

job_events = sa.Table(
    "job_events",
    metadata,
    # Deleted with its job by the trigger `delete_job_events` (migration 0004): no
    # foreign key, whose check would cost every appended event a lookup and a lock.
    sa.Column("job_id", UUID(as_uuid=True), primary_key=True),
    # Dense per job, from 1 (taken from jobs.last_seq in the same transaction).
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("progress", JSONB, nullable=True),
    sa.Column("error", JSONB, nullable=True),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("worker_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("job_types", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("slots", sa.Integer, nullable=False, server_default="1"),
    sa.Column("device", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("version", sa.Text, nullable=False, server_default=""),
    sa.Column("connected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("control_replica", sa.Text, nullable=True),
    sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
    # "<tenant>/<role>" of the key that registered the id (another key is refused)
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    # the tenant whose jobs it runs, or "*" for a shared fleet
    sa.Column("tenant", sa.Text, nullable=False, server_default="*"),
)

# Per (tenant, concurrency key) bookkeeping for the minimum start interval;
# claims lock these rows so two replicas cannot both start past a limit.
concurrency_keys = sa.Table(
    "concurrency_keys",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
)

# Content-addressed blobs, per tenant (the bytes live on disk by sha256).
blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("sha256", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("uploaded_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("content_type", sa.Text, nullable=False, server_default=""),
    sa.Column("filename", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)

# Terminal jobs counted per (tenant, type, state), so GetStats and the metrics
# never count the whole jobs table (which holds every finished job until the
# retention sweeper deletes it). Triggers on `jobs` (migration 0003) append one
# signed delta row per (tenant, type, terminal state) a statement changed;
# `fold_job_counts` folds the deltas into `job_counts` now and then. Appending
# takes no lock that another writer waits for (a counter row updated by every
# completion would serialize them). QUEUED and RUNNING jobs are counted live,
# on their partial indexes.
job_counts = sa.Table(
    "job_counts",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)
job_count_deltas = sa.Table(
    "job_count_deltas",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)
