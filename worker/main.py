"""`spool-worker`: run a worker agent until SIGTERM/SIGINT (drain) or a Drain from control."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from spool import runloop
from worker._config import settings_from_args
from worker.agent import Agent

log = logging.getLogger("spool.worker")


async def _serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_drain, signal.Signals(sig).name)
    await agent.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `spool-worker` command; returns the exit code."""
    settings = settings_from_args(argv)
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        runloop.run(_serve(Agent(settings)))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
