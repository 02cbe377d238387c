"""worker.fetch against a real local HTTP server and real files (no control plane)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker.fetch import fetch_input
from worker.sdk import Cancelled, PermanentError, RetryableError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)


class _Server:
    """A tiny HTTP file server with scripted misbehaviour per path."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self.dropped = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                if self.path.startswith("/missing"):
                    self.send_error(404)
                    return
                if self.path.startswith("/flaky") and outer.dropped < 1 and rng is None:
                    outer.dropped += 1
                    self.send_error(503)
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-", rng or "")
                if m and not self.path.startswith("/norange"):
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"
                    )
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD) - start))
                self.end_headers()
                body = PAYLOAD[start:]
                if self.path.startswith(("/drop", "/norange")) and outer.dropped < 1:
                    # Half the body, then the connection dies.
                    outer.dropped += 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.path.startswith("/stall"):
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    outer.release.wait(10)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def _module_server() -> Iterator[_Server]:
    server = _Server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def http_server(_module_server: _Server) -> _Server:
    """The module's server with its request log and misbehaviour reset."""
    _module_server.requests.clear()
    _module_server.dropped = 0
    return _module_server


def _progress_sink() -> tuple[list[dict], object]:
    calls: list[dict] = []

    def on_progress(**kw: object) -> None:
        calls.append(kw)

    return calls, on_progress


def test_http_download_resumes_with_range_after_drop(http_server: _Server, tmp_path: Path) -> None:
    calls, on_progress = _progress_sink()
    path = fetch_input(
        f"{http_server.url}/drop/clip.bin",
        tmp_path,
        on_progress=on_progress,
        retry_backoff_s=0.01,
    )
    assert path == tmp_path / "clip.bin"
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(PAYLOAD).digest()
    # First a plain GET, then a ranged one starting where the drop left us.
    (_, r1), (_, r2) = http_server.requests
    assert r1 is None
    assert r2 is not None and r2.startswith("bytes=")
    resumed_at = int(r2.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(PAYLOAD)
    # Byte progress with totals, speed in the message; the last one is complete.
    assert calls and all(c["unit"] == "bytes" and c["stage"] == "download" for c in calls)
    assert calls[-1]["done"] == calls[-1]["total"] == len(PAYLOAD)
    assert any(0 < c["done"] < len(PAYLOAD) for c in calls)
    assert "/s" in calls[-1]["message"]
    assert not list(tmp_path.glob("*.part"))


def test_http_server_ignoring_range_restarts_from_zero(
    http_server: _Server, tmp_path: Path
) -> None:
    path = fetch_input(f"{http_server.url}/norange/x.bin", tmp_path, retry_backoff_s=0.01)
    assert path.read_bytes() == PAYLOAD


def test_http_transient_error_is_retried(http_server: _Server, tmp_path: Path) -> None:
    path = fetch_input(f"{http_server.url}/flaky/y.bin", tmp_path, retry_backoff_s=0.01)
    assert path.read_bytes() == PAYLOAD
    assert len(http_server.requests) == 2


def test_http_404_is_permanent(http_server: _Server, tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as err:
        fetch_input(f"{http_server.url}/missing/z.bin", tmp_path)
    assert err.value.code == "INPUT_NOT_FOUND"
    assert len(http_server.requests) == 1


def test_http_stall_fails_retryable_after_retries(http_server: _Server, tmp_path: Path) -> None:
    with pytest.raises(RetryableError) as err:
        fetch_input(
            f"{http_server.url}/stall/s.bin",
            tmp_path,
            stall_timeout_s=0.3,
            max_retries=1,
            retry_backoff_s=0.01,
        )
    assert err.value.code == "INPUT_UNAVAILABLE"
    assert "stalled" in err.value.message


def test_http_connection_refused_is_retryable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RetryableError):
        fetch_input(f"http://127.0.0.1:{port}/a", tmp_path, max_retries=1, retry_backoff_s=0.01)


def test_http_cancel_stops_download(http_server: _Server, tmp_path: Path) -> None:
    with pytest.raises(Cancelled):
        fetch_input(f"{http_server.url}/ok/c.bin", tmp_path, is_cancelled=lambda: True)


def test_file_uri_under_root_is_returned(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    f = root / "a.mp4"
    f.write_bytes(b"x")
    assert fetch_input(f.as_uri(), tmp_path / "d", allowed_file_root=root) == f.resolve()


def test_file_uri_outside_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    (root / "link").symlink_to(secret)
    for uri in (
        secret.as_uri(),
        f"file://{root}/../secret.txt",
        (root / "link").as_uri(),
    ):
        with pytest.raises(PermanentError) as err:
            fetch_input(uri, tmp_path / "d", allowed_file_root=root)
        assert err.value.code == "INVALID_INPUT"
    with pytest.raises(PermanentError):
        fetch_input(secret.as_uri(), tmp_path / "d", allowed_file_root=None)


def test_bad_uris_are_permanent(tmp_path: Path) -> None:
    for uri in ("ftp://host/x", "blob:sha256:xyz", "s3://b/k", "blob:sha256:" + "0" * 64):
        with pytest.raises(PermanentError):
            fetch_input(uri, tmp_path)
