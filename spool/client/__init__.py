"""The Python client of Spool: `AsyncClient` (asyncio) and `Client` (blocking).

    from spool.client import Client

    with Client("127.0.0.1:50051", token="…") as client:
        job = client.submit("video.remove_overlay", {"method": "auto"}, inputs=["clip.mp4"])
        job = client.wait(job.id, timeout=600)
        client.download(job.id, "out/")

Errors are in `spool.client.errors` (root: `SpoolError`). The client imports
only the generated stubs and grpc; it needs nothing of the control plane or
the worker.
"""

from spool.client import errors
from spool.client._async import AsyncClient
from spool.client._convert import TERMINAL_STATES, parse_state, state_name, to_dict
from spool.client._options import DEFAULT_SERVER, ClientOptions
from spool.client._sync import Client
from spool.client.errors import SpoolError

__all__ = [
    "DEFAULT_SERVER",
    "TERMINAL_STATES",
    "AsyncClient",
    "Client",
    "ClientOptions",
    "SpoolError",
    "errors",
    "parse_state",
    "state_name",
    "to_dict",
]
