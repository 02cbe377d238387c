"""Workers are who their key says: each worker id is bound to the key that registered it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 07:30:00.000000

- `workers.owner`: "<tenant>/<role>" of the key whose Hello first registered the
  id; another key presenting the same id is refused (PERMISSION_DENIED).
- `workers.tenant`: the tenant whose jobs the worker may run, or "*" for a
  shared fleet (a fleet key, or auth off); ListWorkers shows a client its own
  tenant's workers and the shared fleet.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("owner", sa.Text(), server_default="", nullable=False))
    op.add_column("workers", sa.Column("tenant", sa.Text(), server_default="*", nullable=False))


def downgrade() -> None:
    op.drop_column("workers", "tenant")
    op.drop_column("workers", "owner")
