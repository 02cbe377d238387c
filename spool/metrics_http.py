"""The `/metrics` HTTP endpoint shared by the control plane and the worker.

One endpoint per port per process: several control planes in one process
(tests) share the default registry and serve it once.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, start_http_server

log = logging.getLogger("spool.metrics")

_servers: dict[int, Any] = {}


def serve(port: int, addr: str = "127.0.0.1") -> bool:
    """Start the `/metrics` endpoint (port 0 = off); True if this call started it.

    A port this process already serves is left alone; a port taken by another
    process raises OSError.
    """
    if port <= 0 or port in _servers:
        return False
    _servers[port] = start_http_server(port, addr=addr, registry=REGISTRY)
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True


def shutdown(port: int) -> None:
    """Stop the endpoint `serve(port)` started (no-op if none)."""
    started = _servers.pop(port, None)
    if started is not None:
        server, thread = started
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
