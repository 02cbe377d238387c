"""The SQL of the worker registry: one row per worker id, kept across reconnects.

Functions take a session and never commit. A worker may reconnect to another
replica before the old stream is noticed dead, so `mark_disconnected` only acts
on the connection it was given (identified by its `connected_at`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control.store.dispatch import ms
from control.store.leases import LEASE_AT_LEAST_SQL

# A Hello: create or refresh the worker's row and mark it connected here — only
# when the id is new or registered to the same owner (the key's tenant/role).
_UPSERT_SQL = sa.text(
    """
    INSERT INTO workers (id, name, labels, job_types, slots, device, version, connected,
                         control_replica, connected_at, last_heartbeat_at, disconnected_at,
                         owner, tenant)
    VALUES (:id, :name, CAST(:labels AS jsonb), CAST(:job_types AS jsonb), :slots,
            CAST(:device AS jsonb), :version, true, :replica,
            CAST(:now AS timestamptz), CAST(:now AS timestamptz), NULL, :owner, :tenant)
    ON CONFLICT (id) DO UPDATE SET
        name = EXCLUDED.name,
        labels = EXCLUDED.labels,
        job_types = EXCLUDED.job_types,
        slots = EXCLUDED.slots,
        device = EXCLUDED.device,
        version = EXCLUDED.version,
        connected = true,
        control_replica = EXCLUDED.control_replica,
        connected_at = EXCLUDED.connected_at,
        last_heartbeat_at = EXCLUDED.last_heartbeat_at,
        disconnected_at = NULL,
        owner = EXCLUDED.owner,
        tenant = EXCLUDED.tenant
    WHERE workers.owner IN (EXCLUDED.owner, '')
    RETURNING id
    """
)


async def upsert_connected(
    session: AsyncSession,
    *,
    worker_id: str,
    name: str,
    labels: Mapping[str, str],
    job_types: Sequence[str],
    slots: int,
    device: Mapping[str, Any],
    version: str,
    replica: str,
    now: datetime,
    owner: str,
    tenant: str,
) -> bool:
    """Record a worker's Hello: its description, connected to `replica` since `now`.

    Returns False (and changes nothing) when the id is registered to another owner.
    """
    result = await session.execute(
        _UPSERT_SQL,
        {
            "id": worker_id,
            "name": name,
            "labels": json.dumps(dict(labels)),
            "job_types": json.dumps(list(job_types)),
            "slots": slots,
            "device": json.dumps(dict(device)),
            "version": version,
            "replica": replica,
            "now": now,
            "owner": owner,
            "tenant": tenant,
        },
    )
    return result.first() is not None


_HEARTBEAT_SQL = sa.text(
    """
    UPDATE workers SET last_heartbeat_at = CAST(:now AS timestamptz)
    WHERE id = :id AND connected_at = CAST(:connected_at AS timestamptz)
    """
)


async def touch_heartbeat(
    session: AsyncSession, worker_id: str, connected_at: datetime, now: datetime
) -> None:
    """Stamp the worker's last heartbeat (for the connection that sent it)."""
    await session.execute(
        _HEARTBEAT_SQL, {"id": worker_id, "connected_at": connected_at, "now": now}
    )


_DISCONNECT_SQL = sa.text(
    """
    UPDATE workers SET connected = false, disconnected_at = CAST(:now AS timestamptz)
    WHERE id = :id AND connected_at = CAST(:connected_at AS timestamptz)
    """
)


async def mark_disconnected(
    session: AsyncSession, worker_id: str, connected_at: datetime, now: datetime
) -> None:
    """Mark the worker disconnected, unless it already reconnected (a newer connected_at).

    Its RUNNING jobs keep their leases: they come back through the lease reaper,
    or at once when the worker reconnects without them.
    """
    await session.execute(
        _DISCONNECT_SQL, {"id": worker_id, "connected_at": connected_at, "now": now}
    )


_DISCONNECT_REPLICA_SQL = sa.text(
    """
    UPDATE workers SET connected = false, disconnected_at = CAST(:now AS timestamptz)
    WHERE connected AND control_replica = :replica
    """
)


async def mark_replica_disconnected(session: AsyncSession, replica: str, now: datetime) -> int:
    """Mark every worker connected to `replica` disconnected (the replica is stopping)."""
    result = await session.execute(_DISCONNECT_REPLICA_SQL, {"replica": replica, "now": now})
    return int(getattr(result, "rowcount", 0) or 0)


# Workers still marked connected whose heartbeats stopped (their replica died
# without closing their streams, or they vanished): marked disconnected. Their
# RUNNING attempts get one more lease from now: while their replica was gone no
# heartbeat could land, so a lease that ran out says nothing about the worker,
# which now has that long to reconnect (elsewhere) before the reaper takes them.
_DISCONNECT_STALE_SQL = sa.text(
    f"""
    WITH gone AS (
        UPDATE workers SET connected = false, disconnected_at = CAST(:now AS timestamptz)
        WHERE connected AND last_heartbeat_at < CAST(:before AS timestamptz)
        RETURNING id
    ), extended AS (
        UPDATE jobs SET lease_expires_at = {LEASE_AT_LEAST_SQL}
        WHERE state = 'running' AND worker_id IN (SELECT id FROM gone)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) AS workers, (SELECT count(*) FROM extended) AS attempts
    """
)


async def mark_stale_disconnected(
    session: AsyncSession, before: datetime, now: datetime, *, lease_s: float
) -> tuple[int, int]:
    """Mark workers whose last heartbeat is older than `before` disconnected and give
    their RUNNING attempts a lease of `lease_s` from `now`; returns (workers, attempts)."""
    row = (
        await session.execute(
            _DISCONNECT_STALE_SQL, {"before": before, "now": now, "lease_ms": ms(lease_s)}
        )
    ).one()
    return int(row.workers), int(row.attempts)
