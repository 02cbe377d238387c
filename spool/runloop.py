"""Run a process's main coroutine on uvloop where it is installed (SPOOL_EVENT_LOOP).

`spool-control` and `spool-worker` spend much of their time in socket I/O to
Postgres and gRPC; uvloop's event loop does that in C. `SPOOL_EVENT_LOOP`:
`auto` (default: uvloop if importable, else asyncio), `uvloop`, or `asyncio`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


def loop_name(choice: str | None = None) -> str:
    """The event loop `run` uses: "uvloop" or "asyncio"."""
    choice = (choice or os.environ.get("SPOOL_EVENT_LOOP") or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"SPOOL_EVENT_LOOP must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """`asyncio.run(main)`, on uvloop unless told (or unable) otherwise."""
    if loop_name(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
