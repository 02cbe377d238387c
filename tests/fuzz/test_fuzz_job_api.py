"""Stateful fuzzing of JobService and BlobService against one real control plane.

Hypothesis drives Submit / SubmitBatch / Get / Cancel / Retry / Delete / List /
WatchProgress / GetStats / ListWorkers and Upload / Stat / Download with absurd
values (see fuzz_support), as tenant "acme", as another tenant and with a
worker key. Every answer must be OK or a clean status (never INTERNAL or
UNKNOWN), a rejected call must write nothing (row counts and seqs unchanged),
and the server must be serving at the end.

The state machine runs in a thread with blocking gRPC stubs (hypothesis'
stateful runner is synchronous) while the control plane serves on the test's
event loop; database counts are read on that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import grpc
from fuzz_support import (
    OK,
    check_error,
    counts,
    int32s,
    int64s,
    job_ids,
    label_maps,
    odd_text,
    scaled,
    small_ints,
    specs,
)
from helpers import TENANT_A_KEY, TENANT_B_KEY, WORKER_KEY
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from spool.v1 import (
    blob_service_pb2,
    blob_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

pb = job_service_pb2
bpb = blob_service_pb2
#: our own deadline for a call that may legitimately wait (a watch of a live job)
WATCH_WAIT_S = 0.3
CALL_TIMEOUT_S = 30.0


class Env:
    """What the machine talks to: blocking stubs and a way to read row counts."""

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop, db: Any) -> None:
        self.channel = grpc.insecure_channel(address)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.blobs = blob_service_pb2_grpc.BlobServiceStub(self.channel)
        self.loop = loop
        self.db = db
        self.calls: dict[str, int] = {}
        self.codes: dict[str, int] = {}

    def counts(self) -> tuple[int, ...]:
        return asyncio.run_coroutine_threadsafe(counts(self.db), self.loop).result(30)

    def call(
        self,
        name: str,
        fn: Callable[..., Any],
        request: Any,
        *,
        key: str = TENANT_A_KEY,
        read_only: bool = False,
        timeout: float = CALL_TIMEOUT_S,
        may_time_out: bool = False,
        kept_when: str = "",
    ) -> Any:
        """Make one call; check it is clean and that a rejected one wrote nothing.

        `kept_when`: a refusal whose details contain this may keep what it wrote
        (an upload that ended early stays resumable).
        """
        before = self.counts()
        self.calls[name] = self.calls.get(name, 0) + 1
        details = ""
        try:
            response = fn(request, metadata=[("authorization", f"Bearer {key}")], timeout=timeout)
            code = OK
        except grpc.RpcError as err:
            response = None
            details = err.details() or ""
            if may_time_out and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = err.code()
            else:
                code = check_error(err, name)
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        kept = bool(kept_when) and kept_when in details
        if (code != OK and not kept) or read_only:
            assert self.counts() == before, f"{name} answered {code.name} but wrote: {details}"
        return response


class JobApiMachine(RuleBasedStateMachine):
    """Random sequences of job and blob calls; `env` is set on a subclass per test."""

    env: Env
    jobs = Bundle("jobs")
    tokens = Bundle("tokens")
    blobs_ = Bundle("blobs")

    @rule(target=jobs, spec=specs)
    def submit(self, spec: job_pb2.JobSpec) -> Any:
        r = self.env.call("Submit", self.env.jobs.Submit, pb.SubmitRequest(job=spec))
        return r.job.id if r is not None else multiple()

    @rule(target=jobs, batch=st.lists(specs, max_size=4))
    def submit_batch(self, batch: list[job_pb2.JobSpec]) -> Any:
        r = self.env.call(
            "SubmitBatch", self.env.jobs.SubmitBatch, pb.SubmitBatchRequest(jobs=batch)
        )
        return multiple(*(j.id for j in r.jobs)) if r is not None else multiple()

    @rule(job_id=st.one_of(jobs, job_ids))
    def get(self, job_id: str) -> None:
        self.env.call("Get", self.env.jobs.Get, pb.GetRequest(job_id=job_id), read_only=True)

    @rule(job_id=st.one_of(jobs, job_ids), reason=st.one_of(st.just(""), odd_text))
    def cancel(self, job_id: str, reason: str) -> None:
        self.env.call(
            "Cancel", self.env.jobs.Cancel, pb.CancelRequest(job_id=job_id, reason=reason)
        )

    @rule(job_id=st.one_of(jobs, job_ids))
    def retry(self, job_id: str) -> None:
        self.env.call("Retry", self.env.jobs.Retry, pb.RetryRequest(job_id=job_id))

    @rule(job_id=st.one_of(consumes(jobs), job_ids))
    def delete(self, job_id: str) -> None:
        self.env.call("Delete", self.env.jobs.Delete, pb.DeleteRequest(job_id=job_id))

    @rule(
        target=tokens,
        states=st.lists(st.integers(-2, 8), max_size=3),
        job_type=st.one_of(st.just(""), st.just("debug.noop"), odd_text),
        labels=label_maps,
        page_size=st.one_of(small_ints, int32s),
        page_token=st.one_of(st.just(""), tokens, odd_text),
    )
    def list_jobs(
        self, states: list[int], job_type: str, labels: dict, page_size: int, page_token: str
    ) -> Any:
        request = pb.ListRequest(
            states=states, type=job_type, labels=labels, page_size=page_size, page_token=page_token
        )
        r = self.env.call("List", self.env.jobs.List, request, read_only=True)
        return r.next_page_token if r is not None and r.next_page_token else multiple()

    @rule(job_id=st.one_of(jobs, job_ids), after_seq=st.one_of(small_ints, int64s))
    def watch(self, job_id: str, after_seq: int) -> None:
        def first_event(request: Any, **kwargs: Any) -> Any:
            call = self.env.jobs.WatchProgress(request, **kwargs)
            try:
                return next(call, None)
            finally:
                call.cancel()

        self.env.call(
            "WatchProgress",
            first_event,
            pb.WatchProgressRequest(job_id=job_id, after_seq=after_seq),
            read_only=True,
            timeout=WATCH_WAIT_S,
            may_time_out=True,
        )

    @rule()
    def stats(self) -> None:
        self.env.call("GetStats", self.env.jobs.GetStats, pb.GetStatsRequest(), read_only=True)
        self.env.call(
            "ListWorkers", self.env.jobs.ListWorkers, pb.ListWorkersRequest(), read_only=True
        )

    @rule(job_id=st.one_of(jobs, job_ids))
    def other_tenant(self, job_id: str) -> None:
        """Another tenant's view of our jobs: NOT_FOUND (or INVALID_ARGUMENT), nothing changes."""
        env = self.env
        for name, fn, request in [
            ("Get", env.jobs.Get, pb.GetRequest(job_id=job_id)),
            ("Cancel", env.jobs.Cancel, pb.CancelRequest(job_id=job_id)),
            ("Retry", env.jobs.Retry, pb.RetryRequest(job_id=job_id)),
            ("Delete", env.jobs.Delete, pb.DeleteRequest(job_id=job_id)),
        ]:
            assert env.call(name, fn, request, key=TENANT_B_KEY, read_only=True) is None

    @rule()
    def worker_key_on_job_service(self) -> None:
        assert (
            self.env.call("GetStats", self.env.jobs.GetStats, pb.GetStatsRequest(), key=WORKER_KEY)
            is None
        )

    @rule(
        target=blobs_,
        data=st.binary(max_size=64),
        right_sha=st.booleans(),
        sha=odd_text,
        size=st.one_of(st.none(), int64s),
        offset=st.one_of(st.just(0), int64s),
        content_type=st.one_of(st.just("text/plain"), odd_text),
        filename=st.one_of(st.just("a.txt"), odd_text),
    )
    def upload(self, data, right_sha, sha, size, offset, content_type, filename) -> Any:
        header = bpb.UploadRequest.Header(
            sha256=hashlib.sha256(data).hexdigest() if right_sha else sha,
            size=len(data) if size is None else size,
            offset=offset,
            content_type=content_type,
            filename=filename,
        )
        requests = [bpb.UploadRequest(header=header)]
        if data:
            requests.append(bpb.UploadRequest(chunk=data))

        def upload(request_iterator: Any, **kwargs: Any) -> Any:
            return self.env.blobs.Upload(iter(request_iterator), **kwargs)

        r = self.env.call("Upload", upload, requests, kept_when="upload incomplete")
        return r.blob.uri if r is not None else multiple()

    @rule(uri=st.one_of(blobs_, odd_text, odd_text.map(lambda t: "blob:sha256:" + t)))
    def stat(self, uri: str) -> None:
        self.env.call("Stat", self.env.blobs.Stat, bpb.StatRequest(uri=uri), read_only=True)

    @rule(
        uri=st.one_of(blobs_, odd_text),
        offset=st.one_of(small_ints, int64s),
        length=st.one_of(small_ints, int64s),
    )
    def download(self, uri: str, offset: int, length: int) -> None:
        def download(request: Any, **kwargs: Any) -> Any:
            return list(self.env.blobs.Download(request, **kwargs))

        request = bpb.DownloadRequest(uri=uri, offset=offset, length=length)
        self.env.call("Download", download, request, read_only=True)

    @invariant()
    def serving(self) -> None:
        # Cheap: the last call's counts were read, so the database and server answer.
        pass


async def test_job_and_blob_api_state_machine(control, db) -> None:
    env = Env(control.address, asyncio.get_running_loop(), db)

    class Machine(JobApiMachine):
        pass

    Machine.env = env
    try:
        await asyncio.to_thread(
            run_state_machine_as_test,
            Machine,
            settings=settings(max_examples=scaled(25), stateful_step_count=30),
        )
        # Still serving after all that (a blocking call: off the loop that serves it).
        stats = await asyncio.to_thread(
            env.jobs.GetStats,
            pb.GetStatsRequest(),
            metadata=[("authorization", f"Bearer {TENANT_A_KEY}")],
            timeout=CALL_TIMEOUT_S,
        )
        assert stats.totals is not None
    finally:
        env.channel.close()
    print(f"\nfuzz job api: {sum(env.calls.values())} calls {env.calls} codes {env.codes}")
    assert sum(env.calls.values()) > 50
