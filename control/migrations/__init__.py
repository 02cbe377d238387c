"""Alembic migrations of the Spool schema (`control/schema.py` is the target).

`upgrade(url)` brings a database to the latest revision; the control plane runs
it at start and `spool-control migrate` runs it alone. Replicas starting at the
same time serialise on a Postgres advisory lock taken in env.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

from control.db import libpq_url

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at these migrations and at `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in a password.
    cfg.set_main_option("sqlalchemy.url", libpq_url(url).replace("%", "%%"))
    return cfg


def upgrade_sync(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (blocking)."""
    command.upgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` without blocking the event loop.

    Alembic is synchronous; it runs in a worker thread with its own event loop
    (env.py drives the asyncpg engine there).
    """
    await asyncio.to_thread(upgrade_sync, url, revision)
