"""A private Postgres from the `pgserver` wheel: the zero-setup default.

With no `SPOOL_DATABASE_URL`, the control plane starts Postgres in
`<data dir>/pg` (initialising it on first use), talks to it over a unix socket,
and stops it when the process exits. Tests use the same thing in a temp dir.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATABASE_NAME = "spool"


def _pgserver() -> Any:
    # platformdirs warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset, at
    # import time of pgserver; harmless, and fatal under filterwarnings=error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver


class EmbeddedPostgres:
    """A Postgres server living in one data directory."""

    def __init__(self, pgdata: str | Path, *, delete_on_stop: bool = False) -> None:
        self.pgdata = Path(pgdata).expanduser().resolve()
        self._delete_on_stop = delete_on_stop
        self._server: Any = None

    def start(self) -> None:
        """Start (or attach to an already running) server; blocking, about a second."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        mode = "delete" if self._delete_on_stop else "stop"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = _pgserver().get_server(self.pgdata, cleanup_mode=mode)
        self._ensure_database(DATABASE_NAME)
        log.info("embedded postgres ready pgdata=%s", self.pgdata)

    def _ensure_database(self, name: str) -> None:
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
        if "(1 row)" not in exists:
            self._server.psql(f'CREATE DATABASE "{name}";')

    def create_database(self, name: str) -> str:
        """Create database `name` when missing and return its URL."""
        self._ensure_database(name)
        return self.url(name)

    def url(self, database: str = DATABASE_NAME) -> str:
        """A `postgresql://` URL reaching `database` through the unix socket."""
        if self._server is None:
            raise RuntimeError("embedded postgres not started")
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        """Stop the server (if this process is its last user)."""
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()
            self._server = None
            log.info("embedded postgres stopped pgdata=%s", self.pgdata)
