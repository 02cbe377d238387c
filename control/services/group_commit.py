"""Group commit: calls that arrive while a write is in flight share the next one.

A lone call is written at once, alone (no timer, no added latency). Calls that
arrive while that write is in flight queue up, and the next write takes all of
them (up to `max_batch` per key) in one statement. Under load the number of
statements, round trips and commits per call falls with the concurrency; idle,
nothing changes. This is the flush window of River's completer and Hatchet's
buffered inserts with the window set by the database itself: it lasts exactly
as long as the previous write.

Each call gets its own result or its own exception: `flush(key, items)` returns
one per item, in order (an exception instance fails only that call). An
exception raised by `flush` itself fails every call of that batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

#: what a flush returns for each item: its result, or the exception it fails with
Outcome = Any
Flush = Callable[[K, Sequence[I]], Awaitable[Sequence[Outcome]]]


class GroupCommit(Generic[K, I, R]):
    """Queue `submit(key, item)` calls; one flush task writes them, a batch per key at a time."""

    def __init__(self, flush: Flush[K, I], *, max_batch: int, name: str) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._name = name
        self._pending: dict[K, list[tuple[I, asyncio.Future[R]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def submit(self, key: K, item: I) -> R:
        """Write `item` with whatever else is queued for `key`; its own result.

        The write is not cut short when the caller is cancelled (the caller
        simply stops waiting), so a connection is never left half-used.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A caller that stopped waiting never reads its outcome: not worth a warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.setdefault(key, []).append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._pending:
                key = next(iter(self._pending))
                queued = self._pending[key]
                batch, rest = queued[: self._max_batch], queued[self._max_batch :]
                if rest:
                    self._pending[key] = rest
                else:
                    del self._pending[key]
                await self._write(key, batch)
        finally:
            self._task = None
            # Cancelled while calls were queued: they fail, never hang.
            for queued in self._pending.values():
                _cancel(queued)
            self._pending.clear()

    async def _write(self, key: K, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._flush(key, [item for item, _ in batch])
        except asyncio.CancelledError:
            _cancel(batch)
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def close(self) -> None:
        """Wait for the writes in flight and queued."""
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


def _cancel(calls: list[tuple[Any, asyncio.Future[Any]]]) -> None:
    """Fail the calls not answered yet with CancelledError."""
    for _, future in calls:
        if not future.done():
            future.set_exception(asyncio.CancelledError())
