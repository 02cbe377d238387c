"""The peers' worker side for bench.throughput: a Celery app and a pgqueuer worker.

Both run a no-op task, like Spool's `debug.noop`. Their packages come from the
`bench` extra (`pip install -e '.[bench]'`); nothing here is imported by
`make test`.

    celery -A bench.peers:celery_app worker …      # BENCH_REDIS_URL names the broker
    python -m bench.peers pgqueuer-worker --dsn postgresql://… --batch-size 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

#: entrypoint name of the pgqueuer no-op job
PGQ_ENTRYPOINT = "noop"


def _celery_app():
    from celery import Celery

    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    app = Celery("bench", broker=f"{url}/0", backend=f"{url}/1")
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    return app


_cached: dict[str, object] = {}


def __getattr__(name: str) -> object:
    # `celery_app` and `noop` are built on first use, so importing this module
    # needs no Celery (and the harness can set BENCH_REDIS_URL first).
    if name not in ("celery_app", "noop"):
        raise AttributeError(name)
    if not _cached:
        app = _celery_app()
        _cached.update(celery_app=app, noop=app.tasks["bench.noop"])
    return _cached[name]


async def pgqueuer_worker(dsn: str, batch_size: int) -> None:
    """One pgqueuer QueueManager on one asyncpg connection, a no-op async entrypoint."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(PGQ_ENTRYPOINT)
    async def _noop(job: Job) -> None:
        return None

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    try:
        await qm.run(batch_size=batch_size)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.peers pgqueuer-worker --dsn … --batch-size N`."""
    p = argparse.ArgumentParser(prog="python -m bench.peers")
    p.add_argument("command", choices=["pgqueuer-worker"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--batch-size", type=int, default=10)
    args = p.parse_args(argv)
    asyncio.run(pgqueuer_worker(args.dsn, args.batch_size))


if __name__ == "__main__":
    main()
