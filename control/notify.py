"""Postgres LISTEN/NOTIFY as wake-up hints, fanned out to in-process subscribers.

One `Notifier` per process holds one dedicated asyncpg connection that LISTENs
on the channels somebody subscribed to, and copies each payload into the queue
of every matching `Subscription`. Payloads are hints: receivers re-read rows.
Hints are lost while the LISTEN connection is down, so after it reconnects every
subscriber gets the wildcard hint `""` ("anything may have changed"). A full
queue drops its oldest hint, so a slow subscriber never blocks anyone.

Channels: `spool_jobs` (payload: job type), `spool_events` and `spool_cancel`
(a job id, or many joined by commas). Send with `notify(session, channel, payload)` inside
the writing transaction; Postgres delivers it on commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

JOBS_CHANNEL = "spool_jobs"
EVENTS_CHANNEL = "spool_events"
CANCEL_CHANNEL = "spool_cancel"
CHANNELS = (JOBS_CHANNEL, EVENTS_CHANNEL, CANCEL_CHANNEL)
#: channels whose payload is a job id, or many joined by commas
ID_CHANNELS = (EVENTS_CHANNEL, CANCEL_CHANNEL)

#: takes events this process committed (job_events rows), in commit order
EventSink = Callable[[Iterable[Mapping[str, Any]]], None]

#: The payload every subscriber receives after a reconnect: re-read everything.
WILDCARD = ""

SUBSCRIPTION_QUEUE_SIZE = 256
RECONNECT_DELAY_S = 0.5
RECONNECT_DELAY_MAX_S = 10.0


async def notify(session: AsyncSession, channel: str, payload: str) -> None:
    """Queue a NOTIFY in the session's transaction (delivered on commit)."""
    await session.execute(
        sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
    )


class Subscription:
    """An async iterator of payload strings from one channel (optionally one key)."""

    def __init__(self, notifier: Notifier, channel: str, key: str | None, maxsize: int) -> None:
        self.channel = channel
        self.key = key
        self._notifier = notifier
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def _offer(self, payload: str) -> None:
        while True:
            try:
                self._queue.put_nowait(payload)
                return
            except asyncio.QueueFull:
                # Hints are interchangeable wake-ups: keep the newest.
                self._queue.get_nowait()
                self.dropped += 1

    async def get(self, wait_s: float | None = None) -> str | None:
        """The next payload, or None after `wait_s` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), wait_s)
        except TimeoutError:
            return None

    def drain(self) -> list[str]:
        """Every payload waiting now, without blocking."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        return await self._queue.get()

    def close(self) -> None:
        """Stop receiving (idempotent)."""
        if not self.closed:
            self.closed = True
            self._notifier._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Notifier:
    """One LISTEN connection per process, shared by every local subscriber."""

    def __init__(self, dsn: str) -> None:
        #: a libpq-style URL (postgresql://…) for asyncpg.connect
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        # channel -> key (None = every payload) -> subscriptions
        self._subs: dict[str, dict[str | None, set[Subscription]]] = defaultdict(
            lambda: defaultdict(set)
        )
        self._listening: set[str] = set()
        self._event_sinks: list[EventSink] = []
        self._reconnect_task: asyncio.Task[None] | None = None
        self._stopped = False
        #: how many times the LISTEN connection was re-established
        self.reconnects = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the LISTEN connection and LISTEN on the known channels."""
        await self._connect()

    async def _connect(self) -> None:
        async with self._lock:
            conn = await asyncpg.connect(self._dsn)
            conn.add_termination_listener(self._on_terminated)
            self._conn = conn
            self._listening = set()
            for channel in CHANNELS:
                await conn.add_listener(channel, self._on_notify)
                self._listening.add(channel)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self.publish_local(channel, payload)

    def publish_local(self, channel: str, payload: str) -> None:
        """Deliver a hint to this process's subscribers only (no database round trip).

        On the job-id channels a payload may name many jobs, comma-separated (one
        NOTIFY per statement that moved many): each subscriber gets one hint per id.
        """
        by_key = self._subs.get(channel)
        if not by_key:
            return
        if payload == WILDCARD:
            for sub in [s for subs in by_key.values() for s in subs]:
                sub._offer(payload)
            return
        keys = payload.split(",") if channel in ID_CHANNELS and "," in payload else (payload,)
        every = by_key.get(None, ())
        for key in keys:
            for sub in [*every, *by_key.get(key, ())]:
                sub._offer(key)

    def add_event_sink(self, sink: EventSink) -> None:
        """Also receive the events this process commits (`publish_events`)."""
        self._event_sinks.append(sink)

    def remove_event_sink(self, sink: EventSink) -> None:
        with contextlib.suppress(ValueError):
            self._event_sinks.remove(sink)

    def publish_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Hand committed events to this process's sinks at once (their NOTIFY follows).

        Only for statements that have committed when they return (autocommit).
        `events` may be lazy: a sink with no use for it does not iterate it.
        """
        sinks = self._event_sinks
        if len(sinks) > 1:
            events = tuple(events)
        for sink in sinks:
            sink(events)

    def _on_terminated(self, _conn: Any) -> None:
        if self._stopped:
            return
        log.warning("notify connection lost; reconnecting")
        self._conn = None
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(), name="notifier-reconnect"
            )

    async def _reconnect(self) -> None:
        delay = RECONNECT_DELAY_S
        while not self._stopped:
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("notify reconnect failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX_S)
                continue
            log.info("notify connection restored")
            self.reconnects += 1
            # Hints sent while we were away are lost: wake everyone to re-read.
            for channel in list(self._subs):
                self.publish_local(channel, WILDCARD)
            return

    def subscribe(
        self, channel: str, key: str | None = None, *, maxsize: int = SUBSCRIPTION_QUEUE_SIZE
    ) -> Subscription:
        """Receive hints on `channel`; with `key`, only payloads equal to it (and wildcards)."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; add it to control.notify.CHANNELS")
        sub = Subscription(self, channel, key, maxsize)
        self._subs[channel][key].add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        by_key = self._subs.get(sub.channel)
        if by_key is None:
            return
        subs = by_key.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del by_key[sub.key]

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._conn is not None and not self._conn.is_closed()

    async def stop(self) -> None:
        """Close the LISTEN connection; subscribers simply stop receiving."""
        self._stopped = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)
