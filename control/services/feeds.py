"""Shared per-job event feeds: one database reader per watched job per replica.

However many clients watch a job on this replica, one `JobFeed` listens for
the job's `spool_events` hints, reads the new `job_events` rows once and hands
them to every local watcher's bounded queue. A watcher whose queue overflows is
marked lagging and catches up from the database itself, so a slow client never
holds back the others and never loses an event.

Events this replica commits itself (a worker's outcome or progress applied
here) are handed to the feed directly (`Notifier.publish_events`): when such an
event is the next one in seq, watchers get it without waiting for the NOTIFY
and reading it back. Anything else (a gap, an event committed elsewhere) still
comes through the hint and the read, which skips what was already handed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from control.notify import EVENTS_CHANNEL, Notifier
from control.store.jobs import Row

log = logging.getLogger(__name__)

#: events a watcher may have waiting before it is marked lagging
WATCHER_QUEUE_SIZE = 256
#: a feed re-reads at least this often even without a NOTIFY (safety net)
FEED_POLL_S = 5.0
#: hints a feed keeps queued (they coalesce: one read serves many)
FEED_HINT_QUEUE_SIZE = 16

#: reads events of a job with seq > after_seq (at most `limit`), in seq order
ReadEvents = Callable[[uuid.UUID, int, int], Awaitable[list[Row]]]


class WatcherQueue:
    """One watcher's inbox of events from a feed.

    A deque and at most one waiting future: a fanned-out event costs one append
    and one wake-up per watcher (an `asyncio.Queue` read under `wait_for` made a
    task per event per watcher, a quarter of the control plane's time when a
    thousand watchers shared a job).
    """

    def __init__(self) -> None:
        self._events: deque[Row] = deque()
        self._waiter: asyncio.Future[None] | None = None
        #: set when events were dropped: the watcher must re-read from the database
        self.lagging = False

    def offer(self, event: Row) -> None:
        """Queue an event, or mark the watcher lagging when its queue is full."""
        if len(self._events) >= WATCHER_QUEUE_SIZE:
            self.lagging = True
            return
        self._events.append(event)
        if self._waiter is not None:
            _wake(self._waiter)

    async def next(self, timeout_s: float) -> Row | None:
        """The next event, or None when none came within `timeout_s`."""
        if not self._events:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._events.popleft() if self._events else None

    def take_lag(self) -> bool:
        """True (once) if events were dropped; empties the queue so reading restarts clean."""
        if not self.lagging:
            return False
        self.lagging = False
        self._events.clear()
        return True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class JobFeed:
    """Reads one job's new events once and fans them out to local watchers.

    It is subscribed to the job's hints from the moment it is made, and reads
    from the seq its first watcher's own read ended at (`start`): the watcher
    reads the history, the feed everything committed after it.
    """

    def __init__(
        self, job_id: uuid.UUID, notifier: Notifier, read_events: ReadEvents, batch: int
    ) -> None:
        self.job_id = job_id
        self.watchers: set[WatcherQueue] = set()
        self._read_events = read_events
        self._batch = batch
        self._last_seq = 0
        self._start: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Subscribed before any watcher's first read, so no commit falls in between.
        self._hints = notifier.subscribe(
            EVENTS_CHANNEL, key=str(job_id), maxsize=FEED_HINT_QUEUE_SIZE
        )
        self.task = asyncio.create_task(self._run(), name=f"watch-feed-{job_id}")

    def start(self, last_seq: int) -> None:
        """Read events after `last_seq` from now on (the first call wins; later ones are no-ops).

        A watcher whose own read ended earlier than that sees a gap in seq and
        catches up from the database, so a late start never loses an event.
        """
        if not self._start.done():
            self._last_seq = last_seq
            self._start.set_result(last_seq)

    def deliver(self, event: Row) -> None:
        """An event this replica committed: to the watchers now if it is the next one.

        Otherwise (the feed has not started, or an event in between is still to
        be read) it is left to the read its NOTIFY brings.
        """
        if self._start.done() and event["seq"] == self._last_seq + 1 and self.alive:
            self._fan_out(event)

    def _fan_out(self, event: Row) -> None:
        self._last_seq = event["seq"]
        for watcher in self.watchers:
            watcher.offer(event)

    async def _run(self) -> None:
        try:
            await self._start
            while True:
                await self._hints.get(FEED_POLL_S)
                self._hints.drain()
                await self._read_new()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Watchers notice (feed task done) and fall back to reading themselves.
            log.exception("event feed of job %s failed", self.job_id)
        finally:
            self._hints.close()

    async def _read_new(self) -> None:
        while True:
            events = await self._read_events(self.job_id, self._last_seq, self._batch)
            for event in events:
                # Handed on already while the read was in flight (`deliver`)?
                if event["seq"] > self._last_seq:
                    self._fan_out(event)
            if len(events) < self._batch:
                return

    @property
    def alive(self) -> bool:
        """False once the feed task ended (failed or stopped)."""
        return not self.task.done()


class FeedHub:
    """The replica's feeds, created on the first watcher of a job and stopped after the last."""

    def __init__(self, notifier: Notifier, read_events: ReadEvents, batch: int) -> None:
        self._notifier = notifier
        self._read_events = read_events
        self._batch = batch
        self._feeds: dict[uuid.UUID, JobFeed] = {}
        notifier.add_event_sink(self.deliver)

    def deliver(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Events this replica committed (in commit order): to their jobs' feeds, if any."""
        if not self._feeds:
            return
        for event in events:
            feed = self._feeds.get(event["job_id"])
            if feed is not None:
                feed.deliver(event)

    def join(self, job_id: uuid.UUID) -> tuple[JobFeed, WatcherQueue]:
        """Attach a watcher to the job's feed; events committed after this reach it.

        The watcher reads the history itself and then calls `feed.start` with
        the last seq that read saw.
        """
        feed = self._feeds.get(job_id)
        if feed is None or not feed.alive:
            feed = JobFeed(job_id, self._notifier, self._read_events, self._batch)
            self._feeds[job_id] = feed
        watcher = WatcherQueue()
        feed.watchers.add(watcher)
        return feed, watcher

    def leave(self, feed: JobFeed, watcher: WatcherQueue) -> None:
        """Detach a watcher; the feed stops with its last watcher."""
        feed.watchers.discard(watcher)
        if feed.watchers:
            return
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        feed.task.cancel()

    async def close(self) -> None:
        """Stop every feed (server shutdown)."""
        self._notifier.remove_event_sink(self.deliver)
        feeds = list(self._feeds.values())
        self._feeds.clear()
        for feed in feeds:
            feed.task.cancel()
        for feed in feeds:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed.task

    def stats(self) -> dict[str, Any]:
        """Feeds and watchers open on this replica."""
        return {
            "feeds": len(self._feeds),
            "watchers": sum(len(f.watchers) for f in self._feeds.values()),
        }
