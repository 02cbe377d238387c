"""`Client`: the blocking twin of `AsyncClient`, for scripts and the CLI.

It runs an `AsyncClient` on a private event loop in a background thread, so it
works the same from plain code and from inside someone else's running loop.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from spool.client._async import AsyncClient
from spool.v1 import job_pb2, job_service_pb2

T = TypeVar("T")


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


class _SyncIterator(Iterator[T]):
    """Pulls items from an async iterator living on the client's loop."""

    def __init__(self, client: Client, agen: AsyncIterator[T]) -> None:
        self._client = client
        self._agen = agen
        self._done = False

    def __iter__(self) -> _SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            return self._client._run(_anext(self._agen))
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """Stop early (closes the underlying stream)."""
        if not self._done:
            self._done = True
            aclose = getattr(self._agen, "aclose", None)
            if aclose is not None and not self._client._closed:

                async def close() -> None:
                    await aclose()

                if threading.current_thread() is self._client._thread:
                    # Garbage-collected on the loop's own thread: waiting would deadlock.
                    self._client._loop.create_task(close())
                else:
                    self._client._run(close())

    def __del__(self) -> None:
        # An abandoned iterator must not keep a stream open.
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A blocking Spool client; the same methods as `AsyncClient`, same arguments.

    with Client() as client:
        job = client.submit("debug.sleep", {"duration": 2})
        for event in client.watch(job.id):
            print(event.seq, event.progress.fraction)
        print(client.wait(job.id, timeout=60).state)
    """

    def __init__(self, server: str = "", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spool-client", daemon=True
        )
        self._thread.start()
        self._closed = False

        async def make() -> AsyncClient:
            return AsyncClient(server, **kwargs)

        try:
            self._client = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        self.options = self._client.options

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Close the channel and stop the background loop."""
        if self._closed:
            return
        self._closed = True
        self._run(self._client.close())
        self._run(self._loop.shutdown_asyncgens())
        self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server(self) -> str:
        """The host:port this client talks to."""
        return self._client.server

    def upload(self, path: str | Path) -> str:
        """See `AsyncClient.upload`."""
        return self._run(self._client.upload(path))

    def submit(self, type: str, params: dict[str, Any] | None = None, *a: Any, **kw: Any) -> Any:
        """See `AsyncClient.submit`."""
        return self._run(self._client.submit(type, params, *a, **kw))

    def submit_batch(self, specs: builtins.list[Any]) -> builtins.list[job_pb2.Job]:
        """See `AsyncClient.submit_batch`."""
        return self._run(self._client.submit_batch(specs))

    def get(self, job_id: str) -> job_pb2.Job:
        """See `AsyncClient.get`."""
        return self._run(self._client.get(job_id))

    def list(self, *a: Any, **kw: Any) -> _SyncIterator[job_pb2.Job]:
        """See `AsyncClient.list` (an iterator fetching pages lazily)."""
        return _SyncIterator(self, self._client.list(*a, **kw))

    def stats(self) -> job_service_pb2.GetStatsResponse:
        """See `AsyncClient.stats`."""
        return self._run(self._client.stats())

    def workers(self, include_disconnected: bool = False) -> builtins.list[job_pb2.Worker]:
        """See `AsyncClient.workers`."""
        return self._run(self._client.workers(include_disconnected))

    def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        """See `AsyncClient.cancel`."""
        return self._run(self._client.cancel(job_id, reason))

    def retry(self, job_id: str) -> job_pb2.Job:
        """See `AsyncClient.retry`."""
        return self._run(self._client.retry(job_id))

    def delete(self, job_id: str) -> None:
        """See `AsyncClient.delete`."""
        self._run(self._client.delete(job_id))

    def watch(self, job_id: str, after_seq: int = 0) -> _SyncIterator[job_pb2.JobEvent]:
        """See `AsyncClient.watch` (a blocking iterator)."""
        return _SyncIterator(self, self._client.watch(job_id, after_seq))

    def wait(self, job_id: str, timeout: float | None = None) -> job_pb2.Job:
        """See `AsyncClient.wait`."""
        return self._run(self._client.wait(job_id, timeout))

    def download(self, job_id: str, output_dir: str | Path = ".") -> builtins.list[Path]:
        """See `AsyncClient.download`."""
        return self._run(self._client.download(job_id, output_dir))
