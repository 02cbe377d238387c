"""`AsyncClient`: every JobService and BlobService call, with retries and typed errors."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from spool.client import errors
from spool.client._blobs import _Backoff, download_blob, retrying, upload_file
from spool.client._convert import TERMINAL_STATES, build_spec, is_uri, parse_state
from spool.client._options import ClientOptions, open_channel
from spool.v1 import (
    blob_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

#: List pages the client asks for (the server caps them at 1000)
DEFAULT_PAGE_SIZE = 100
#: statuses after which a watch reconnects and resumes: the control plane went
#: away (UNAVAILABLE) or ended the stream while shutting down (CANCELLED)
_WATCH_RECONNECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class AsyncClient:
    """An asyncio client of a Spool control plane.

        async with AsyncClient(server="127.0.0.1:50051", token="…") as client:
            job = await client.submit("debug.sleep", {"duration": 2})
            async for event in client.watch(job.id):
                print(event.seq, event.progress.fraction)
            job = await client.get(job.id)

    Options not given fall back to SPOOL_SERVER, SPOOL_TOKEN, SPOOL_TLS,
    SPOOL_TLS_CA (see `ClientOptions`). Calls that are safe to repeat retry
    UNAVAILABLE with exponential backoff; Submit is made safe by a request_id.
    """

    def __init__(
        self,
        server: str = "",
        *,
        token: str = "",
        tls: bool | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        timeout: float = 30.0,
        retry_budget: float = 30.0,
        reconnect_budget: float = 120.0,
        options: ClientOptions | None = None,
    ) -> None:
        opts = options or ClientOptions(
            server=server,
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout_s=timeout,
            retry_budget_s=retry_budget,
            reconnect_budget_s=reconnect_budget,
        )
        self.options = opts.resolved()
        self._channel = open_channel(self.options)
        self._jobs = job_service_pb2_grpc.JobServiceStub(self._channel)
        self._blobs = blob_service_pb2_grpc.BlobServiceStub(self._channel)
        self._md = self.options.metadata()

    @property
    def server(self) -> str:
        """The host:port this client talks to."""
        return self.options.server

    async def close(self) -> None:
        """Close the channel (open watches end)."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, *, retry: bool = True) -> Any:
        async def call() -> Any:
            return await method(request, metadata=self._md, timeout=self.options.timeout_s)

        return await retrying(call, self.options, retry=retry)

    # -- submitting ---------------------------------------------------------

    async def upload(self, path: str | Path) -> str:
        """Upload a local file to BlobService and return its `blob:sha256:…` URI.

        The sha256 is computed first: content the tenant already stored is not
        sent again, and a partial upload resumes where it stopped.
        """
        p = Path(path).expanduser()  # noqa: ASYNC240 (no I/O)
        if not await asyncio.to_thread(p.is_file):
            raise errors.InvalidArgument("inputs", f"{path}: no such file")
        blob = await upload_file(self._blobs, p, self.options)
        return blob.uri

    async def _resolve_inputs(self, inputs: Iterable[str | Path]) -> builtins.list[str]:
        resolved = []
        for i, item in enumerate(inputs):
            text = str(item)
            if isinstance(item, str) and is_uri(text):
                resolved.append(text)
                continue
            if not await asyncio.to_thread(Path(text).expanduser().is_file):  # noqa: ASYNC240
                raise errors.InvalidArgument(f"inputs[{i}]", f"{text}: no such file")
            resolved.append(await self.upload(text))
        return resolved

    async def _spec(
        self, type: str, inputs: Iterable[str | Path] = (), **fields: Any
    ) -> job_pb2.JobSpec:
        fields["request_id"] = fields.get("request_id") or str(uuid.uuid4())
        try:
            return build_spec(type, inputs=await self._resolve_inputs(inputs), **fields)
        except (ValueError, TypeError) as exc:
            raise errors.InvalidArgument("job", str(exc)) from None

    async def submit(
        self,
        type: str,
        params: Mapping[str, Any] | None = None,
        inputs: Iterable[str | Path] = (),
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        concurrency_key: str | None = None,
        *,
        concurrency_limit: int = 0,
        worker_selector: Mapping[str, str] | None = None,
        min_start_interval: float | dt.timedelta | None = None,
        not_before: float | dt.datetime | None = None,
        timeout: float | dt.timedelta | None = None,  # noqa: ASYNC109 (the job's, not this call's)
        max_attempts: int = 0,
        request_id: str | None = None,
    ) -> job_pb2.Job:
        """Submit one job and return it (QUEUED).

        `inputs` are URIs (blob:sha256:…, https://…, file://…) or local paths;
        local files are uploaded first and replaced by their blob URIs.
        Durations are seconds (or timedeltas), `not_before` Unix seconds or an
        aware datetime. A `request_id` is generated when none is given, so a
        retried Submit never makes a second job; passing the same request_id
        again returns the first job.
        """
        spec = await self._spec(
            type,
            inputs,
            params=params,
            priority=priority,
            labels=labels,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
            worker_selector=worker_selector,
            min_start_interval=min_start_interval,
            not_before=not_before,
            timeout=timeout,
            max_attempts=max_attempts,
            request_id=request_id,
        )
        response = await self._unary(
            self._jobs.Submit, job_service_pb2.SubmitRequest(job=spec), retry=True
        )
        return response.job

    async def submit_batch(
        self, specs: Sequence[Mapping[str, Any] | job_pb2.JobSpec]
    ) -> builtins.list[job_pb2.Job]:
        """Submit many jobs in one transaction (all or nothing); jobs in request order.

        Each spec is a JobSpec or a dict of `submit`'s arguments (`type`,
        `params`, `inputs`, …). Every spec gets a request_id when it has none,
        so the batch is retried safely.
        """
        built = []
        for spec in specs:
            if isinstance(spec, job_pb2.JobSpec):
                copy = job_pb2.JobSpec()
                copy.CopyFrom(spec)
                copy.request_id = copy.request_id or str(uuid.uuid4())
                built.append(copy)
            else:
                fields = dict(spec)
                job_type, inputs = fields.pop("type"), fields.pop("inputs", ())
                built.append(await self._spec(job_type, inputs, **fields))
        response = await self._unary(
            self._jobs.SubmitBatch, job_service_pb2.SubmitBatchRequest(jobs=built), retry=True
        )
        return list(response.jobs)

    # -- reading ------------------------------------------------------------

    async def get(self, job_id: str) -> job_pb2.Job:
        """The job as stored now."""
        response = await self._unary(self._jobs.Get, job_service_pb2.GetRequest(job_id=job_id))
        return response.job

    async def list(
        self,
        states: Iterable[str | int] = (),
        type: str = "",
        labels: Mapping[str, str] | None = None,
        *,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[job_pb2.Job]:
        """Jobs newest first, fetched a page at a time as you iterate (at most `limit`)."""
        try:
            state_numbers = [job_pb2.JobState.ValueType(parse_state(s)) for s in states]
        except ValueError as exc:
            raise errors.InvalidArgument("states", str(exc)) from None
        token = ""
        yielded = 0
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - yielded))
            request = job_service_pb2.ListRequest(
                states=state_numbers,
                type=type,
                labels=dict(labels or {}),
                page_size=size,
                page_token=token,
            )
            response = await self._unary(self._jobs.List, request)
            for job in response.jobs:
                if limit is not None and yielded >= limit:
                    return
                yield job
                yielded += 1
            token = response.next_page_token
            if not token or (limit is not None and yielded >= limit):
                return

    async def stats(self) -> job_service_pb2.GetStatsResponse:
        """Counts by state and by type, queue depth, oldest queued age, connected workers."""
        return await self._unary(self._jobs.GetStats, job_service_pb2.GetStatsRequest())

    async def workers(self, include_disconnected: bool = False) -> builtins.list[job_pb2.Worker]:
        """Workers known to the control plane."""
        request = job_service_pb2.ListWorkersRequest(include_disconnected=include_disconnected)
        response = await self._unary(self._jobs.ListWorkers, request)
        return list(response.workers)

    # -- changing -----------------------------------------------------------

    async def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        """Cancel: QUEUED jobs at once, RUNNING ones are asked to stop; terminal: no-op."""
        request = job_service_pb2.CancelRequest(job_id=job_id, reason=reason)
        return (await self._unary(self._jobs.Cancel, request)).job

    async def retry(self, job_id: str) -> job_pb2.Job:
        """Requeue a FAILED or CANCELED job with a fresh attempt budget."""
        # Not retried on UNAVAILABLE: a lost reply would make the second try fail.
        request = job_service_pb2.RetryRequest(job_id=job_id)
        return (await self._unary(self._jobs.Retry, request, retry=False)).job

    async def delete(self, job_id: str) -> None:
        """Delete a terminal job and its history."""
        request = job_service_pb2.DeleteRequest(job_id=job_id)
        await self._unary(self._jobs.Delete, request, retry=False)

    # -- following ----------------------------------------------------------

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[job_pb2.JobEvent]:
        """The job's events after `after_seq`, then live ones; ends after the terminal event.

        When the connection breaks (the control plane restarts, a network
        blip) the watch reconnects with backoff and resumes after the last
        event it yielded: no event is missed or repeated.
        """
        last = after_seq
        budget = self.options.reconnect_budget_s
        backoff = _Backoff(self.options, budget)
        while True:
            request = job_service_pb2.WatchProgressRequest(job_id=job_id, after_seq=last)
            ended_terminal = False
            try:
                async for response in self._jobs.WatchProgress(request, metadata=self._md):
                    event = response.event
                    if event.seq <= last:
                        continue  # replayed after a reconnect: already yielded
                    last = event.seq
                    backoff = _Backoff(self.options, budget)
                    ended_terminal = (
                        event.kind == job_pb2.JOB_EVENT_KIND_STATE
                        and event.state in TERMINAL_STATES
                    )
                    yield event
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _WATCH_RECONNECT and await backoff.sleep():
                    continue
                raise errors.from_rpc_error(exc) from None
            if ended_terminal:
                return
            # The stream ended without a terminal event (a server stopping
            # gracefully): resume unless the job is in fact finished.
            job = await self.get(job_id)
            if job.state in TERMINAL_STATES and job.last_seq <= last:
                return
            if not await backoff.sleep():
                raise errors.Unavailable(f"watch of {job_id} kept ending early")

    async def wait(self, job_id: str, timeout: float | None = None) -> job_pb2.Job:  # noqa: ASYNC109
        """Wait until the job is terminal and return it; `WaitTimeout` after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                job = await self.get(job_id)
                if job.state not in TERMINAL_STATES:
                    async for _ in self.watch(job_id, after_seq=job.last_seq):
                        pass
                return await self.get(job_id)
        except TimeoutError:
            raise errors.WaitTimeout(
                f"job {job_id} not finished after {timeout:g}s"  # type: ignore[str-format]
            ) from None

    async def download(self, job_id: str, output_dir: str | Path = ".") -> builtins.list[Path]:
        """Download the job's blob outputs into `output_dir`; returns the files written."""
        job = await self.get(job_id)
        out = Path(output_dir).expanduser()  # noqa: ASYNC240 (no I/O)
        taken: set[str] = set()
        paths = []
        for uri in job.outputs:
            if not uri.startswith("blob:sha256:"):
                continue  # outputs elsewhere (URLs) are the user's to fetch
            paths.append(await download_blob(self._blobs, uri, out, self.options, taken=taken))
        return paths
