"""One named background loop that runs a pass every interval: the control plane's chores.

The retention sweeper, the blob collector, the metrics refresher and the lease
enforcers are all the same shape: run a pass that opens and owns its own
session, log a failed pass and carry on, stop cleanly. Stopping never cuts a
pass short (a query cancelled half-way can leak its connection): the pass runs
as its own shielded task and `stop()` waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

#: pause after a failed pass (e.g. the database restarting)
FAILED_PASS_BACKOFF_S = 5.0


class Periodic:
    """Run `one_pass` every `interval_s` as the named task `name`.

    `again(result)`, when given, decides whether a pass goes again at once (a
    pass that filled its batch, say) instead of sleeping first.
    """

    def __init__(
        self,
        name: str,
        one_pass: Callable[[], Awaitable[Any]],
        interval_s: float,
        *,
        again: Callable[[Any], bool] | None = None,
        failed_backoff_s: float = FAILED_PASS_BACKOFF_S,
    ) -> None:
        self.name = name
        self.one_pass = one_pass
        self.interval_s = interval_s
        self.again = again
        self.failed_backoff_s = failed_backoff_s
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        """Start the loop."""
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        """Stop the loop; a pass in flight runs to its end first."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
            self._inflight = None

    async def _loop(self) -> None:
        while True:
            try:
                self._inflight = asyncio.ensure_future(self.one_pass())
                result = await asyncio.shield(self._inflight)
                self._inflight = None
                if self.again is not None and self.again(result):
                    continue
                delay = self.interval_s
            except asyncio.CancelledError:
                raise
            except Exception:
                self._inflight = None
                log.exception("%s: pass failed", self.name)
                delay = self.failed_backoff_s
            await asyncio.sleep(delay)
