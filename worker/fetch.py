"""Job inputs in, job outputs out: blob, HTTP(S) and file URIs on the worker side.

`fetch_input` turns an input URI into a local file:

- ``blob:sha256:<hex>`` — streamed from the control plane's BlobService (resumed
  from the last byte on a broken stream) and checked against its hash;
- ``http://`` / ``https://`` — streamed to a ``.part`` file; a dropped or stalled
  connection is retried with ``Range: bytes=N-`` so the bytes already there are
  kept (the download-manager lesson), with bytes, speed and ETA reported as
  progress;
- ``file://`` — only under the root directory this worker was configured to
  allow (symlinks resolved first).

`upload_output` sends a result file to BlobService (resuming a broken upload
from what the server already has) and returns its ``blob:sha256:`` URI.

Failures are `worker.sdk` errors carrying their retry decision: a missing input
is a `PermanentError`, a network problem that outlasts the retries a
`RetryableError`. Everything here is blocking; it runs in the handler's thread
or process, never on the worker's event loop.
"""

from __future__ import annotations

import hashlib
import http.client
import mimetypes
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc

from spool.client._blobs import file_sha256
from spool.v1 import blob_service_pb2, blob_service_pb2_grpc
from worker._context import resolve_local_input
from worker.sdk import Cancelled, PermanentError, RetryableError

#: chunk size of uploads (the server refuses more than 1 MiB per message)
UPLOAD_CHUNK_BYTES = 1024 * 1024
#: read size of HTTP downloads
HTTP_READ_BYTES = 256 * 1024
#: consecutive failed tries (without a byte of progress) before giving up
MAX_RETRIES = 5
#: first retry delay; doubles per consecutive failure, capped
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 10.0
#: a connection that delivers nothing for this long counts as dropped
STALL_TIMEOUT_S = 30.0
#: at most this many progress reports per second (the final one always goes out)
PROGRESS_INTERVAL_S = 0.25

#: on_progress(done=…, total=…, unit="bytes", stage="download", message=…)
ProgressFn = Callable[..., Any]

_SHA_URI_RE = re.compile(r"^blob:sha256:([0-9a-fA-F]{64})$")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

# Keepalive so a dead control plane is noticed in seconds, not minutes.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]

# Statuses after which the same call may well succeed a moment later.
_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class BlobClient:
    """A blocking BlobService client: a channel, the worker's key and the job it acts for.

    Workers call BlobService on behalf of the attempt they hold: the
    ``spool-job-id``, ``spool-worker-id`` and ``spool-attempt`` metadata tell the
    control plane which job (and so which tenant) the call is for, and let it
    check that this worker holds that attempt. Build one per worker with
    `connect` and derive per-attempt clients with `for_job` (they share the channel).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        token: str | None = None,
        job_id: str | None = None,
        worker_id: str | None = None,
        attempt: int | None = None,
        owns_channel: bool = False,
    ) -> None:
        self.channel = channel
        self.token = token
        self.job_id = job_id
        self.worker_id = worker_id
        self.attempt = attempt
        self._owns_channel = owns_channel
        self._stub = blob_service_pb2_grpc.BlobServiceStub(channel)

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        token: str | None = None,
        job_id: str | None = None,
        worker_id: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> BlobClient:
        """Open a channel to `address` (TLS when `credentials` is given)."""
        if credentials is not None:
            channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return cls(channel, token=token, job_id=job_id, worker_id=worker_id, owns_channel=True)

    def for_job(self, job_id: str | None, attempt: int | None = None) -> BlobClient:
        """A client sharing this channel that acts for attempt `attempt` of `job_id`."""
        return BlobClient(
            self.channel,
            token=self.token,
            job_id=job_id,
            worker_id=self.worker_id,
            attempt=attempt,
        )

    def metadata(self) -> list[tuple[str, str]]:
        """Call metadata: the bearer token, and the job, worker and attempt, when set."""
        md = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if self.job_id:
            md.append(("spool-job-id", self.job_id))
        if self.worker_id:
            md.append(("spool-worker-id", self.worker_id))
        if self.attempt is not None:
            md.append(("spool-attempt", str(self.attempt)))
        return md

    def stat(self, uri: str, *, timeout: float = 30.0) -> blob_service_pb2.StatResponse:
        """BlobService.Stat."""
        return self._stub.Stat(
            blob_service_pb2.StatRequest(uri=uri), metadata=self.metadata(), timeout=timeout
        )

    def download(self, uri: str, offset: int = 0, length: int = 0) -> Any:
        """BlobService.Download: an iterator of DownloadResponse with `.cancel()`."""
        req = blob_service_pb2.DownloadRequest(uri=uri, offset=offset, length=length)
        return self._stub.Download(req, metadata=self.metadata())

    def upload(
        self, requests: Iterator[blob_service_pb2.UploadRequest]
    ) -> blob_service_pb2.UploadResponse:
        """BlobService.Upload from an iterator of requests (header first)."""
        return self._stub.Upload(requests, metadata=self.metadata())

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> BlobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Progress:
    """Throttled byte progress with speed and ETA in the message."""

    def __init__(self, on_progress: ProgressFn | None, stage: str) -> None:
        self._fn = on_progress
        self._stage = stage
        self._start = time.monotonic()
        self._start_done: int | None = None
        self._last = 0.0

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self._fn is None:
            return
        now = time.monotonic()
        if self._start_done is None:
            # Speed counts bytes moved by this fetch, not bytes resumed from disk.
            self._start_done = done
        if not final and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        elapsed = max(now - self._start, 1e-6)
        speed = (done - self._start_done) / elapsed
        message = f"{_human(speed)}/s"
        if total and speed > 0 and done < total:
            message += f", ETA {(total - done) / speed:.0f} s"
        self._fn(done=done, total=total or 0, unit="bytes", stage=self._stage, message=message)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _safe_name(name: str, fallback: str) -> str:
    """One safe path component derived from `name` (extension kept), else `fallback`."""
    base = os.path.basename(name.replace("\\", "/"))
    base = _SAFE_NAME_RE.sub("_", base).strip("._")[:200]
    return base or fallback


def _sleep_unless_cancelled(seconds: float, is_cancelled: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if is_cancelled():
            raise Cancelled("cancelled while waiting to retry a download")
        time.sleep(min(left, 0.05))


def _backoff(failures: int, base: float) -> float:
    return min(base * (2 ** (failures - 1)), RETRY_BACKOFF_MAX_S)


def fetch_input(
    uri: str,
    dest_dir: Path | str,
    *,
    blob_client: BlobClient | None = None,
    allowed_file_root: Path | str | None = None,
    on_progress: ProgressFn | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    max_retries: int = MAX_RETRIES,
    retry_backoff_s: float = RETRY_BACKOFF_S,
) -> Path:
    """Make input `uri` a local file (under `dest_dir` unless it is an allowed file) and return it.

    Raises `PermanentError` for inputs that can never be fetched (unknown scheme,
    404, a file outside `allowed_file_root`), `RetryableError` when the source
    stayed unreachable through `max_retries` consecutive tries, and
    `worker.sdk.Cancelled` once `is_cancelled()` turns true.
    """
    dest = Path(dest_dir)
    cancelled = is_cancelled or (lambda: False)
    if _SHA_URI_RE.match(uri):
        if blob_client is None:
            raise PermanentError(
                f"cannot fetch {uri}: this worker has no BlobService connection",
                code="INVALID_INPUT",
            )
        dest.mkdir(parents=True, exist_ok=True)
        progress = _Progress(on_progress, "download")
        return _fetch_blob(
            uri, dest, blob_client, progress, cancelled, max_retries, retry_backoff_s
        )
    if uri.startswith("blob:"):
        raise PermanentError(
            f"malformed blob URI (want blob:sha256:<hex>): {uri}", code="INVALID_INPUT"
        )
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        dest.mkdir(parents=True, exist_ok=True)
        progress = _Progress(on_progress, "download")
        return _fetch_http(
            uri, dest, progress, cancelled, stall_timeout_s, max_retries, retry_backoff_s
        )
    if scheme == "file":
        return _resolve_file(uri, allowed_file_root)
    raise PermanentError(
        f"unsupported input URI scheme {scheme or '(none)'!r}: {uri}", code="INVALID_INPUT"
    )


# -- file:// ---------------------------------------------------------------------


def _resolve_file(uri: str, allowed_file_root: Path | str | None) -> Path:
    if allowed_file_root is None:
        raise PermanentError(
            f"file:// inputs are not allowed on this worker (no allowed file root): {uri}",
            code="INVALID_INPUT",
        )
    # The same check as the harness: symlinks and '..' resolved, then kept under the root.
    return resolve_local_input(uri, Path(allowed_file_root))


# -- blob:sha256: ------------------------------------------------------------------


def _fetch_blob(
    uri: str,
    dest: Path,
    client: BlobClient,
    progress: _Progress,
    is_cancelled: Callable[[], bool],
    max_retries: int,
    backoff_s: float,
) -> Path:
    sha = _SHA_URI_RE.match(uri).group(1).lower()  # type: ignore[union-attr]
    uri = f"blob:sha256:{sha}"
    part = dest / f"{sha}.part"
    digest = hashlib.sha256()
    done = 0
    total: int | None = None
    filename = ""
    failures = 0
    with open(part, "wb") as f:
        while True:
            call = client.download(uri, offset=done)
            before = done
            try:
                for msg in call:
                    if msg.HasField("blob"):
                        total, filename = msg.blob.size, msg.blob.filename
                    if msg.offset != done:
                        raise RetryableError(
                            f"download of {uri} returned offset {msg.offset}, expected {done}",
                            code="INPUT_UNAVAILABLE",
                        )
                    f.write(msg.chunk)
                    digest.update(msg.chunk)
                    done += len(msg.chunk)
                    progress(done, total)
                    if is_cancelled():
                        raise Cancelled(f"cancelled while downloading {uri}")
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    raise PermanentError(
                        f"input {uri} not found: {exc.details()}", code="INPUT_NOT_FOUND"
                    ) from None
                if code not in _TRANSIENT_CODES:
                    raise RetryableError(
                        f"download of {uri} failed: {code.name}: {exc.details()}",
                        code="INPUT_UNAVAILABLE",
                    ) from None
                failures = 1 if done > before else failures + 1
                if failures > max_retries:
                    raise RetryableError(
                        f"download of {uri} failed after {max_retries} retries: "
                        f"{code.name}: {exc.details()}",
                        code="INPUT_UNAVAILABLE",
                    ) from None
                _sleep_unless_cancelled(_backoff(failures, backoff_s), is_cancelled)
            finally:
                call.cancel()
    progress(done, total, final=True)
    if (total is not None and done != total) or digest.hexdigest() != sha:
        part.unlink(missing_ok=True)
        raise RetryableError(
            f"downloaded {uri} does not match its sha256 ({done} bytes)", code="INPUT_CORRUPT"
        )
    final = dest / _safe_name(filename, sha)
    os.replace(part, final)
    return final


# -- http(s):// --------------------------------------------------------------------


class _Retry(Exception):
    """One HTTP try failed in a way another try may fix."""


def _fetch_http(
    uri: str,
    dest: Path,
    progress: _Progress,
    is_cancelled: Callable[[], bool],
    stall_timeout_s: float,
    max_retries: int,
    backoff_s: float,
) -> Path:
    name = _safe_name(unquote(urlparse(uri).path), "download")
    part = dest / f"{name}.part"
    part.write_bytes(b"")
    state = {"done": 0, "total": None}
    failures = 0
    while True:
        before = state["done"]
        try:
            if _http_try(uri, part, state, progress, is_cancelled, stall_timeout_s):
                break
            raise _Retry("connection closed before the end of the body")
        except _Retry as exc:
            failures = 1 if state["done"] > before else failures + 1
            if failures > max_retries:
                raise RetryableError(
                    f"download of {uri} failed after {max_retries} retries: {exc}",
                    code="INPUT_UNAVAILABLE",
                ) from None
            _sleep_unless_cancelled(_backoff(failures, backoff_s), is_cancelled)
    progress(state["done"], state["total"], final=True)
    final = dest / name
    os.replace(part, final)
    return final


def _http_try(
    uri: str,
    part: Path,
    state: dict[str, Any],
    progress: _Progress,
    is_cancelled: Callable[[], bool],
    stall_timeout_s: float,
) -> bool:
    """One GET (ranged when resuming); True once the whole body is in `part`."""
    done: int = state["done"]
    headers = {"User-Agent": "spool-worker", "Accept-Encoding": "identity"}
    if done:
        headers["Range"] = f"bytes={done}-"
    req = urllib.request.Request(uri, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=stall_timeout_s)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and done and state["total"] == done:
                return True  # we already have every byte
            if exc.code == 416:
                state["done"] = 0  # our partial is bogus: start over
                raise _Retry("416 range not satisfiable") from None
            if exc.code in (404, 410):
                raise PermanentError(
                    f"input {uri} not found (HTTP {exc.code})", code="INPUT_NOT_FOUND"
                ) from None
            if exc.code in (408, 425, 429) or exc.code >= 500:
                raise _Retry(f"HTTP {exc.code}") from None
            raise PermanentError(
                f"input {uri}: HTTP {exc.code} {exc.reason}", code="INPUT_HTTP_ERROR"
            ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retry(_describe(exc, stall_timeout_s)) from None
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != done:
                state["done"] = 0  # a range we did not ask for: start over plainly
                raise _Retry("server answered with an unexpected Content-Range")
            if m.group(3) != "*":
                state["total"] = int(m.group(3))
        else:
            # 200: the server ignored Range (or we did not send one): from byte 0.
            done = state["done"] = 0
            length = resp.headers.get("Content-Length")
            state["total"] = int(length) if length and length.isdigit() else None
        total = state["total"]
        with open(part, "r+b") as f:
            f.truncate(done)
            f.seek(done)
            # Always report where a try starts, so a resume is visible as progress.
            progress(done, total, final=True)
            while True:
                if is_cancelled():
                    raise Cancelled(f"cancelled while downloading {uri}")
                try:
                    block = resp.read(HTTP_READ_BYTES)
                except http.client.IncompleteRead as exc:
                    f.write(exc.partial)
                    state["done"] = done + len(exc.partial)
                    raise _Retry("connection dropped mid-body") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(_describe(exc, stall_timeout_s)) from None
                if not block:
                    break
                f.write(block)
                done += len(block)
                state["done"] = done
                progress(done, total)
    return total is None or done >= total


def _describe(exc: BaseException, stall_timeout_s: float) -> str:
    if isinstance(exc, socket.timeout | TimeoutError) or "timed out" in str(exc):
        return f"stalled: no data for {stall_timeout_s:g} s"
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


# -- outputs -------------------------------------------------------------------------


def _upload_requests(
    path: Path, header: blob_service_pb2.UploadRequest.Header
) -> Iterator[blob_service_pb2.UploadRequest]:
    yield blob_service_pb2.UploadRequest(header=header)
    with open(path, "rb") as f:
        f.seek(header.offset)
        while block := f.read(UPLOAD_CHUNK_BYTES):
            yield blob_service_pb2.UploadRequest(chunk=block)


def upload_output(
    path: Path | str,
    *,
    blob_client: BlobClient,
    tenant: str | None = None,
    job_id: str | None = None,
    attempt: int | None = None,
    content_type: str | None = None,
    max_retries: int = MAX_RETRIES,
    retry_backoff_s: float = RETRY_BACKOFF_S,
) -> str:
    """Upload `path` to BlobService and return its ``blob:sha256:<hex>`` URI.

    The blob lands in the tenant of the job the client acts for (`job_id` and
    `attempt` override the client's); `tenant` is accepted for symmetry and not sent —
    the control plane decides the tenant from the job, never from the worker.
    Content the tenant already has is not sent again; a broken upload resumes
    from the bytes the server holds.
    """
    del tenant
    path = Path(path)
    client = blob_client
    if job_id and (job_id, attempt) != (blob_client.job_id, blob_client.attempt):
        client = blob_client.for_job(job_id, attempt)
    sha, size = file_sha256(path)
    uri = f"blob:sha256:{sha}"
    ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    failures = 0
    while True:
        try:
            offset = 0
            try:
                st = client.stat(uri)
                if st.complete:
                    return uri
                if 0 < st.uploaded_bytes <= size:
                    offset = st.uploaded_bytes
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            header = blob_service_pb2.UploadRequest.Header(
                sha256=sha, size=size, content_type=ctype, filename=path.name, offset=offset
            )
            client.upload(_upload_requests(path, header))
            return uri
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise PermanentError(
                    f"cannot store output {path.name}: {exc.details()}", code="QUOTA_EXCEEDED"
                ) from None
            transient = code in _TRANSIENT_CODES or code == grpc.StatusCode.FAILED_PRECONDITION
            failures += 1
            if not transient or failures > max_retries:
                raise RetryableError(
                    f"upload of output {path.name} failed: {code.name}: {exc.details()}",
                    code="OUTPUT_UPLOAD_FAILED",
                ) from None
            time.sleep(_backoff(failures, retry_backoff_s))
