"""The job API's decisions: validation, idempotency, transitions, paging, watching.

No SQL (control.store.jobs / events) and no protobuf (the servicer converts).
Each method opens and owns its sessions; database work runs in a shielded task
so a caller that goes away mid-query (client cancel, deadline) never leaves a
connection half-used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from control import metrics, validate
from control.config import Settings
from control.db import Database
from control.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    is_bad_value,
)
from control.notify import Notifier
from control.schema import JOB_STATES, TERMINAL_STATES
from control.services.blobs import check_blob_inputs
from control.services.feeds import FeedHub
from control.services.group_commit import GroupCommit
from control.store import events as events_store
from control.store import jobs as store
from control.store.jobs import NewJob, Row

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAMS_BYTES = 1024 * 1024
MAX_TYPE_LEN = 200
MAX_REQUEST_ID_LEN = 200
MAX_KEY_LEN = 200
MAX_INPUTS = 256
MAX_INPUT_LEN = 4096
INPUT_SCHEMES = ("blob:", "http://", "https://", "file://")
MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_MAX_ATTEMPTS = 1000
MAX_BATCH = 1000
#: a batch's per-job Python work (checks, rows, messages) runs this many jobs at a
#: time, yielding to the event loop in between: a 1,000-job batch holds the loop
#: for tens of milliseconds, and claims, completions and other calls wait meanwhile
YIELD_EVERY = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_LEN = 1024
MAX_CANCEL_REASON_LEN = 1000
#: events read per query while replaying history
WATCH_BATCH = 500
#: a watcher with no event for this long checks the database once (job deleted, …)
WATCH_IDLE_CHECK_S = 30.0
#: Cancel re-reads and retries its compare-and-set at most this often
CANCEL_CAS_ROUNDS = 8


@dataclass
class JobSpec:
    """What a client asks for (durations in ms); validated into a store.NewJob."""

    type: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[str] = ()
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    worker_selector: Mapping[str, str] = field(default_factory=dict)
    concurrency_key: str = ""
    concurrency_limit: int = 0
    min_start_interval_ms: int = 0
    not_before: datetime | None = None
    timeout_ms: int = 0
    max_attempts: int = 0
    request_id: str = ""


@dataclass
class Stats:
    """GetStats: counts per state, overall and per type, plus queue figures."""

    totals: dict[str, int]
    by_type: dict[str, dict[str, int]]
    queue_depth: int
    oldest_queued_age: timedelta
    connected_workers: int


def parse_job_id(text: str, field_name: str = "job_id") -> uuid.UUID:
    """A job id from a request: a UUID string, else INVALID_ARGUMENT naming the field."""
    return validate.job_id(field_name, text)


def validate_spec(
    spec: JobSpec,
    prefix: str,
    default_max_attempts: int,
    now: datetime | None = None,
    job_id: uuid.UUID | None = None,
) -> NewJob:
    """Check every field of a spec (errors name `<prefix>.<field>`) and build the row to insert.

    The limits are the documented ones (docs/control-plane.md, "Limits"):
    nothing that Postgres cannot store (NUL, NaN/Infinity) and no duration or
    time that could overflow a timestamp later (in the claim, in a retry).
    """

    def name(field_name: str) -> str:
        return f"{prefix}.{field_name}"

    def bad(field_name: str, why: str) -> InvalidArgument:
        return InvalidArgument(name(field_name), why)

    job_type = validate.text(
        name("type"), spec.type, max_len=MAX_TYPE_LEN, required=True, strip=True
    )
    validate.integer(name("priority"), spec.priority, lo=MIN_PRIORITY, hi=MAX_PRIORITY)
    if spec.params:
        params = validate.json_value(name("params"), dict(spec.params), max_bytes=None)
        params_json = json.dumps(params, separators=(",", ":"), sort_keys=True, allow_nan=False)
        if len(params_json.encode()) > MAX_PARAMS_BYTES:
            raise bad("params", f"at most {MAX_PARAMS_BYTES} bytes once serialized")
        params = json.loads(params_json)
    else:
        params, params_json = {}, "{}"
    if len(spec.inputs) > MAX_INPUTS:
        raise bad("inputs", f"at most {MAX_INPUTS} inputs")
    for i, uri in enumerate(spec.inputs):
        if (
            not isinstance(uri, str)
            or not uri.startswith(INPUT_SCHEMES)
            or len(uri) > MAX_INPUT_LEN
        ):
            raise bad(f"inputs[{i}]", f"must be a URI starting with one of {INPUT_SCHEMES}")
        validate.text(name(f"inputs[{i}]"), uri, max_len=MAX_INPUT_LEN)
    labels = validate.label_map(name("labels"), spec.labels)
    worker_selector = validate.label_map(name("worker_selector"), spec.worker_selector)
    concurrency_key = validate.text(
        name("concurrency_key"), spec.concurrency_key, max_len=MAX_KEY_LEN
    )
    validate.integer(name("concurrency_limit"), spec.concurrency_limit, lo=0, hi=validate.INT32_MAX)
    validate.integer(
        name("min_start_interval"),
        spec.min_start_interval_ms,
        lo=0,
        hi=validate.MAX_MIN_START_INTERVAL_MS,
    )
    if spec.not_before is not None:
        now = now or datetime.now(UTC)
        validate.not_after(
            name("not_before"),
            spec.not_before,
            now + validate.MAX_NOT_BEFORE_AHEAD,
            what="1 year from now",
        )
    validate.integer(name("timeout"), spec.timeout_ms, lo=0, hi=validate.MAX_TIMEOUT_MS)
    validate.integer(name("max_attempts"), spec.max_attempts, lo=0, hi=MAX_MAX_ATTEMPTS)
    request_id = validate.text(name("request_id"), spec.request_id, max_len=MAX_REQUEST_ID_LEN)
    normalized = {
        "type": job_type,
        "params": params,
        "inputs": list(spec.inputs),
        "priority": spec.priority,
        "labels": labels,
        "worker_selector": worker_selector,
        "concurrency_key": concurrency_key or None,
        "concurrency_limit": spec.concurrency_limit,
        "min_start_interval_ms": spec.min_start_interval_ms,
        "not_before": spec.not_before,
        "timeout_ms": spec.timeout_ms,
        "max_attempts": spec.max_attempts or default_max_attempts,
    }
    # The idempotency check compares what was asked, not when or under which key
    # (only a job with a request_id can be asked for again).
    digest = (
        hashlib.sha256(json.dumps(normalized, sort_keys=True, default=str).encode()).hexdigest()
        if request_id
        else None
    )
    return NewJob(
        id=job_id or uuid.uuid4(),
        request_id=request_id or None,
        spec_hash=digest,
        params_json=params_json,
        **normalized,
    )


async def in_turns(items: Iterable[T]) -> AsyncIterator[tuple[int, T]]:
    """`enumerate(items)`, yielding to the event loop every YIELD_EVERY items."""
    for i, item in enumerate(items):
        if i and not i % YIELD_EVERY:
            await asyncio.sleep(0)
        yield i, item


def new_job_ids(n: int) -> list[uuid.UUID]:
    """`n` random (version 4) UUIDs from one read of the OS's random source."""
    raw = os.urandom(16 * n)
    return [uuid.UUID(bytes=raw[16 * i : 16 * i + 16], version=4) for i in range(n)]


def encode_page_token(created_at: datetime, job_id: uuid.UUID) -> str:
    """Opaque keyset position: base64url of {"c": created_at, "i": id}."""
    raw = json.dumps({"c": created_at.isoformat(), "i": str(job_id)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    """The keyset position in a token, else INVALID_ARGUMENT page_token.

    Anything but a token this module made is refused the same way: not
    base64, not JSON, not an object, a position that is not two strings, a
    naive or out-of-range time, an id that is not a UUID.
    """
    malformed = InvalidArgument("page_token", "malformed; pass back a next_page_token")
    if not isinstance(token, str) or len(token) > MAX_PAGE_TOKEN_LEN or not token.isascii():
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise malformed
        created, ident = data.get("c"), data.get("i")
        if not isinstance(created, str) or not isinstance(ident, str):
            raise malformed
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise malformed
        return created_at, uuid.UUID(ident)
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
        # (UnicodeDecodeError and json.JSONDecodeError are ValueErrors.)
        raise malformed from None


def is_terminal_event(event: Row) -> bool:
    """True for the STATE event that entered a terminal state."""
    return event["kind"] == store.EVENT_STATE and event["state"] in TERMINAL_STATES


class JobsService:
    """Submit, read, list, cancel, retry, delete, stats and watch jobs of a tenant."""

    def __init__(self, db: Database, notifier: Notifier, settings: Settings) -> None:
        self.db = db
        self.notifier = notifier
        self.settings = settings
        self.feeds = FeedHub(notifier, self._read_events, WATCH_BATCH)
        #: single submits of one tenant that arrive together share one INSERT
        self._submits: GroupCommit[str, NewJob, tuple[Row, bool]] = GroupCommit(
            self._insert_submits, max_batch=MAX_BATCH, name="jobs.submit-group-commit"
        )

    async def _tx(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in its own session and transaction, shielded from caller cancellation."""

        async def run() -> T:
            async with self.db.transaction() as session:
                return await work(session)

        return await self.db.shielded(run())

    async def _one(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Like `_tx` for single statements and plain reads: autocommit, no BEGIN/COMMIT."""

        async def run() -> T:
            async with self.db.autocommit() as conn:
                return await work(conn)

        return await self.db.shielded(run())

    # ------------------------------------------------------------ submit

    async def submit(self, tenant: str, spec: JobSpec) -> tuple[Row, bool]:
        """Create a QUEUED job, or return the one this request_id made (deduplicated=True).

        Submits that arrive while another one's INSERT is in flight are inserted
        together by the next statement (group commit); each still gets its own
        answer or error.
        """
        job = validate_spec(spec, "job", self.settings.default_max_attempts)
        if any(uri.startswith("blob:") for uri in job.inputs):
            await self._one(lambda s: check_blob_inputs(s, tenant, [("job", job.inputs)]))
        row, deduplicated = await self._submits.submit(tenant, job)
        if not deduplicated:
            metrics.SUBMITTED.labels(type=row["type"]).inc()
        return row, deduplicated

    async def _insert_submits(self, tenant: str, jobs: Sequence[NewJob]) -> list[Any]:
        """One INSERT for the single submits of a group commit: (row, deduplicated) or an
        exception per job. A value the database refuses fails only its own submit."""

        async def work(s: AsyncSession) -> list[Any]:
            inserted = {row["id"]: row for row in await store.insert_jobs(s, tenant, jobs)}
            missing = [j.request_id or "" for j in jobs if j.id not in inserted]
            existing = await store.get_jobs_by_request_ids(s, tenant, missing) if missing else {}
            out: list[Any] = []
            for job in jobs:
                if job.id in inserted:
                    out.append((inserted[job.id], False))
                    continue
                try:
                    out.append((_same_request(existing.get(job.request_id or ""), job,
                                              "request_id"), True))  # fmt: skip
                except Exception as exc:
                    out.append(exc)
            return out

        try:
            return await self._one(work)
        except Exception as exc:
            if len(jobs) == 1 or not is_bad_value(exc):
                raise
        out: list[Any] = []
        for job in jobs:
            try:
                out += await self._insert_submits(tenant, [job])
            except Exception as exc:
                out.append(exc)
        return out

    async def submit_batch(self, tenant: str, specs: Sequence[JobSpec]) -> list[Row]:
        """Create many jobs in one transaction, all or nothing, in request order."""
        if len(specs) > MAX_BATCH:
            raise InvalidArgument("jobs", f"at most {MAX_BATCH} jobs per batch")
        new_jobs: list[NewJob] = []
        seen: set[str] = set()
        ids = new_job_ids(len(specs))
        async for i, spec in in_turns(specs):
            job = validate_spec(spec, f"jobs[{i}]", self.settings.default_max_attempts,
                                job_id=ids[i])  # fmt: skip
            if job.request_id is not None:
                if job.request_id in seen:
                    raise InvalidArgument(f"jobs[{i}].request_id", "repeated within the batch")
                seen.add(job.request_id)
            new_jobs.append(job)

        async def work(s: AsyncSession) -> list[Row]:
            await check_blob_inputs(
                s, tenant, [(f"jobs[{i}]", j.inputs) for i, j in enumerate(new_jobs)]
            )
            inserted = {row["id"]: row for row in await store.insert_jobs(s, tenant, new_jobs)}
            missing = [j for j in new_jobs if j.id not in inserted]
            existing = await store.get_jobs_by_request_ids(
                s, tenant, [j.request_id or "" for j in missing]
            )
            out = []
            for i, job in enumerate(new_jobs):
                if job.id in inserted:
                    out.append(inserted[job.id])
                    continue
                row = existing.get(job.request_id or "")
                out.append(_same_request(row, job, f"jobs[{i}].request_id"))
            return out

        # Without idempotency keys one INSERT creates the whole batch (all or nothing
        # by itself, no BEGIN/COMMIT); a key that clashes must undo the rest.
        rows = await (self._tx if seen else self._one)(work)
        # Committed: count the jobs this batch created (not the deduplicated ones).
        created = {job.id for job in new_jobs}
        metrics.count_by_type(
            metrics.SUBMITTED, (row["type"] for row in rows if row["id"] in created)
        )
        return rows

    # ------------------------------------------------------------ read

    async def get(self, tenant: str, job_id: uuid.UUID) -> Row:
        """The tenant's job, else NOT_FOUND."""
        row = await self._one(lambda s: store.get_job(s, tenant, job_id))
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    async def list_jobs(
        self,
        tenant: str,
        *,
        states: Sequence[str] = (),
        job_type: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Row], str]:
        """One page of the tenant's jobs, newest first, and the token of the next ('' at end)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        job_type = validate.text("type", job_type, max_len=MAX_TYPE_LEN)
        labels = validate.label_map("labels", labels or {})
        for state in states:
            if state not in JOB_STATES:
                raise InvalidArgument("states", f"unknown state {state!r}")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else None
        rows = await self._one(
            lambda s: store.list_jobs(
                s,
                tenant,
                states=states,
                job_type=job_type,
                labels=labels,
                after=after,
                limit=limit + 1,
            )
        )
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        return rows[:limit], encode_page_token(last["created_at"], last["id"])

    # ------------------------------------------------------------ transitions

    async def cancel(self, tenant: str, job_id: uuid.UUID, reason: str = "") -> Row:
        """QUEUED → CANCELED; RUNNING → cancel requested; terminal → unchanged."""
        reason = validate.text("reason", reason, max_len=MAX_CANCEL_REASON_LEN)

        async def work(s: Any) -> Row:
            for _ in range(CANCEL_CAS_ROUNDS):
                job = await store.get_job(s, tenant, job_id)
                if job is None:
                    raise NotFound(f"job {job_id} not found")
                if job["state"] == "queued":
                    row = await store.cancel_queued_job(s, tenant, job_id, job["attempt"], reason)
                    if row is not None:  # committed (autocommit): the job ended here
                        metrics.FINISHED.labels(type=row["type"], state=row["state"]).inc()
                elif job["state"] == "running":
                    if job["cancel_requested"]:
                        return job
                    row = await store.request_cancel(s, tenant, job_id, job["attempt"], reason)
                else:
                    return job
                if row is not None:
                    return row
                # Lost a race with a worker; re-read (a new statement sees its commit).
            assert job is not None
            return job

        # Each compare-and-set is atomic on its own: no enclosing transaction.
        return await self._one(work)

    async def retry(self, tenant: str, job_id: uuid.UUID) -> Row:
        """FAILED/CANCELED → QUEUED with a fresh attempt budget, else FAILED_PRECONDITION."""

        async def work(s: Any) -> Row:
            row = await store.retry_job(s, tenant, job_id)
            if row is not None:
                return row
            job = await store.get_job(s, tenant, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            raise FailedPrecondition(
                f"job is {job['state']}; only failed or canceled jobs can be retried",
                reason="JOB_NOT_RETRYABLE",
            )

        return await self._one(work)

    async def delete(self, tenant: str, job_id: uuid.UUID) -> None:
        """Delete a terminal job and its history, else FAILED_PRECONDITION / NOT_FOUND."""

        async def work(s: Any) -> None:
            if await store.delete_terminal_job(s, tenant, job_id):
                return
            job = await store.get_job(s, tenant, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            raise FailedPrecondition(
                f"job is {job['state']}; only finished jobs can be deleted (cancel it first)",
                reason="JOB_NOT_TERMINAL",
            )

        await self._one(work)

    # ------------------------------------------------------------ stats

    async def stats(self, tenant: str | None) -> Stats:
        """Counts by state and type, queue depth, oldest claimable age, connected workers.

        `tenant` None: every tenant's jobs (the control plane's metrics).
        """

        async def work(s: Any) -> tuple[list[Row], int, datetime]:
            return (
                await store.job_stats(s, tenant),
                await store.count_connected_workers(s),
                await store.db_now(s),
            )

        rows, connected, now = await self._one(work)
        totals = dict.fromkeys(JOB_STATES, 0)
        by_type: dict[str, dict[str, int]] = {}
        depth = 0
        oldest: datetime | None = None
        for row in rows:
            totals[row["state"]] += row["n"]
            by_type.setdefault(row["type"], dict.fromkeys(JOB_STATES, 0))[row["state"]] = row["n"]
            depth += row["ready"]
            if row["oldest"] is not None and (oldest is None or row["oldest"] < oldest):
                oldest = row["oldest"]
        age = max(now - oldest, timedelta(0)) if oldest is not None else timedelta(0)
        return Stats(totals, by_type, depth, age, connected)

    async def list_workers(self, tenant: str, include_disconnected: bool) -> list[Row]:
        """Registered workers (filled by WorkerService)."""
        return await self._one(
            lambda s: store.list_workers(s, tenant, include_disconnected=include_disconnected)
        )

    # ------------------------------------------------------------ watch

    async def _read_events(self, job_id: uuid.UUID, after_seq: int, limit: int) -> list[Row]:
        return await self._one(
            partial(events_store.list_events, job_id=job_id, after_seq=after_seq, limit=limit)
        )

    async def _read_for_watch(
        self, tenant: str, job_id: uuid.UUID, after_seq: int
    ) -> events_store.WatchRead | None:
        return await self._one(
            partial(events_store.read_for_watch, tenant=tenant, job_id=job_id,
                    after_seq=after_seq, limit=WATCH_BATCH)
        )  # fmt: skip

    async def watch(self, tenant: str, job_id: uuid.UUID, after_seq: int) -> AsyncIterator[Row]:
        """The job's events with seq > after_seq, then live ones; ends after the terminal event.

        Catches up from the database, then takes live events from the job's
        shared feed (one reader per job per replica, control.services.feeds),
        going back to the database whenever the feed cannot vouch for
        continuity (a gap in seq, an overflowed queue, a dead feed, a long
        silence). Events are sent in seq order, each once.
        """
        if after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        # Joined before the first read, so every later commit reaches us one way or the other.
        feed, inbox = self.feeds.join(job_id)
        try:
            read = await self._read_for_watch(tenant, job_id, after_seq)
        except BaseException:
            self.feeds.leave(feed, inbox)
            raise
        if read is None:
            self.feeds.leave(feed, inbox)
            raise NotFound(f"job {job_id} not found")
        feed.start(read.last_seq)
        metrics.OPEN_STREAMS.labels(kind="watch").inc()
        try:
            last = after_seq
            catch_up = True
            while True:
                if catch_up:
                    catch_up = False
                    # Catch up from the database, a page at a time (one statement reads
                    # the job and a page of its events: they agree). The first page of
                    # the watch is the read above.
                    while True:
                        if read is None:
                            read = await self._read_for_watch(tenant, job_id, last)
                            if read is None:
                                return  # deleted while watched
                            feed.start(read.last_seq)  # a feed joined anew starts here
                        page, read = read, None
                        for i, event in enumerate(page.events):
                            yield event
                            last = event["seq"]
                            # The end, unless a Retry started the job again: refused late
                            # messages after it are history, not part of this watch.
                            if is_terminal_event(event) and not any(
                                e["kind"] == store.EVENT_STATE for e in page.events[i + 1 :]
                            ):
                                return
                        if len(page.events) < WATCH_BATCH:
                            break
                    # Caught up, and past the end already (a watch resumed after it)?
                    if page.state in TERMINAL_STATES and page.last_seq <= last:
                        return
                if not feed.alive:
                    self.feeds.leave(feed, inbox)
                    feed, inbox = self.feeds.join(job_id)
                    catch_up = True
                    continue
                event = await inbox.next(WATCH_IDLE_CHECK_S)
                if event is None:
                    catch_up = True  # long silence: look at the database once
                    continue
                if inbox.take_lag() or event["seq"] > last + 1:
                    catch_up = True
                    continue
                if event["seq"] <= last:
                    continue
                yield event
                last = event["seq"]
                if is_terminal_event(event):
                    return
        finally:
            metrics.OPEN_STREAMS.labels(kind="watch").dec()
            self.feeds.leave(feed, inbox)


def stats_as_dict(stats: Stats) -> dict[str, Any]:
    """Stats as plain data (for logs and the CLI)."""
    return asdict(stats)


def _same_request(row: Row | None, job: NewJob, field: str) -> Row:
    """The stored job a repeated request_id names; ALREADY_EXISTS if its payload differs."""
    if row is None:
        raise FailedPrecondition("request_id raced with a delete; submit again")
    if row["spec_hash"] != job.spec_hash:
        raise AlreadyExists(
            f"{field} {job.request_id!r} was used for a different job {row['id']}",
            reason="REQUEST_ID_REUSED",
        )
    return row
