"""Worker settings: every flag has a `SPOOL_*` environment variable (flag wins).

See docs/worker.md for the table.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"
#: keepalive pings while the stream is quiet; a dead control plane is noticed
#: within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: the most jobs a worker may hold beyond its slots (control refuses more)
MAX_PREFETCH = 1024

_TRUE = {"1", "true", "yes", "on"}


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` → dict; raises ValueError naming a bad item."""
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


@dataclass
class WorkerSettings:
    """Everything `spool-worker` can be told."""

    server: str = DEFAULT_SERVER
    token: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    worker_id: str = ""
    state_dir: str = ""
    name: str = field(default_factory=socket.gethostname)
    labels: dict[str, str] = field(default_factory=dict)
    slots: int = 1
    #: jobs taken beyond the free slots, waiting here for one (0: off)
    prefetch: int = 0
    #: restrict the job types served (empty: every type whose handler loads)
    types: list[str] = field(default_factory=list)
    device: str = "auto"
    drain_grace_s: float = 30.0
    handlers: str = ""
    file_root: str = ""
    workdir: str = ""
    keepalive_time_ms: int = KEEPALIVE_TIME_MS
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS
    log_level: str = "INFO"
    #: Prometheus /metrics (worker.metrics); 0 = off
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"

    def connection(self) -> dict[str, Any]:
        """What a slot process needs to reach the control plane (BlobService)."""
        return {
            "server": self.server,
            "token": self.token,
            "tls": self.tls,
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
        }


def build_parser() -> argparse.ArgumentParser:
    """The `spool-worker` command line; defaults come from the environment."""
    p = argparse.ArgumentParser(
        prog="spool-worker",
        description="Pull jobs from a Spool control plane and run them.",
    )
    a = p.add_argument
    a("--server", default=_env("SPOOL_SERVER", DEFAULT_SERVER), help="control plane host:port")
    a("--token", default=_env("SPOOL_TOKEN"), help="worker API key (Bearer)")
    a("--tls", action=argparse.BooleanOptionalAction,
      default=_env("SPOOL_TLS").lower() in _TRUE, help="use TLS")  # fmt: skip
    a("--tls-ca", default=_env("SPOOL_TLS_CA"), help="CA bundle (PEM) to verify the server")
    a("--tls-cert", default=_env("SPOOL_TLS_CERT"), help="client certificate (PEM), for mTLS")
    a("--tls-key", default=_env("SPOOL_TLS_KEY"), help="client private key (PEM), for mTLS")
    a("--worker-id", default=_env("SPOOL_WORKER_ID"), help="stable worker id")
    a("--state-dir", default=_env("SPOOL_WORKER_STATE_DIR"), help="where the worker id is kept")
    a("--name", default=_env("SPOOL_WORKER_NAME", socket.gethostname()), help="display name")
    a("--labels", default=_env("SPOOL_WORKER_LABELS"), help="k=v,k=v")
    a("--slots", type=int, default=int(_env("SPOOL_WORKER_SLOTS", "1")), help="jobs at once")
    a("--prefetch", type=int, default=int(_env("SPOOL_WORKER_PREFETCH", "0")),
      help="jobs taken beyond the free slots, to wait here for one (0: off)")  # fmt: skip
    a("--types", default=_env("SPOOL_WORKER_TYPES"), help="only these job types (comma list)")
    a("--device", default=_env("SPOOL_DEVICE", "auto"), help="auto|cpu|cuda|cuda:N")
    a("--drain-grace", type=float, default=float(_env("SPOOL_DRAIN_GRACE_S", "30")),
      help="seconds running jobs get to finish on SIGTERM/Drain")  # fmt: skip
    a("--handlers", default=_env("SPOOL_WORKER_HANDLERS"), help="pkg.module:Class,… to load")
    a("--file-root", default=_env("SPOOL_FILE_ROOT"), help="allowed root for file:// inputs")
    a("--workdir", default=_env("SPOOL_WORKER_WORKDIR"), help="scratch root for job workdirs")
    keepalive = int(_env("SPOOL_WORKER_KEEPALIVE_MS", str(KEEPALIVE_TIME_MS)))
    a("--keepalive-ms", type=int, default=keepalive, help="gRPC keepalive ping interval")
    a("--log-level", default=_env("SPOOL_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING…")
    a("--metrics-port", type=int, default=int(_env("SPOOL_WORKER_METRICS_PORT") or 0),
      help="serve Prometheus /metrics on this port (0: off)")  # fmt: skip
    a("--metrics-addr", default=_env("SPOOL_WORKER_METRICS_ADDR") or "127.0.0.1",
      help="bind address of /metrics (0.0.0.0: all interfaces)")  # fmt: skip
    return p


def settings_from_args(argv: list[str] | None = None) -> WorkerSettings:
    """Parse flags (falling back to env) into settings; exits with a message on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        labels = parse_labels(ns.labels)
    except ValueError as exc:
        parser.error(f"--labels: {exc}")
    if ns.slots < 1:
        parser.error("--slots must be at least 1")
    if not 0 <= ns.prefetch <= MAX_PREFETCH:
        parser.error(f"--prefetch must be between 0 and {MAX_PREFETCH}")
    if not 0 <= ns.metrics_port <= 65535:
        parser.error("--metrics-port must be between 0 (off) and 65535")
    if (ns.tls_cert or ns.tls_key) and not (ns.tls_cert and ns.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return WorkerSettings(
        server=ns.server,
        token=ns.token,
        tls=ns.tls or bool(ns.tls_ca or ns.tls_cert),
        tls_ca=ns.tls_ca,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        worker_id=ns.worker_id,
        state_dir=ns.state_dir,
        name=ns.name,
        labels=labels,
        slots=ns.slots,
        prefetch=ns.prefetch,
        types=[t.strip() for t in ns.types.split(",") if t.strip()],
        device=ns.device,
        drain_grace_s=ns.drain_grace,
        handlers=ns.handlers,
        file_root=ns.file_root,
        workdir=ns.workdir,
        keepalive_time_ms=ns.keepalive_ms,
        log_level=ns.log_level.upper(),
        metrics_port=ns.metrics_port,
        metrics_addr=ns.metrics_addr,
    )


def channel_credentials(conn: dict[str, Any]) -> grpc.ChannelCredentials | None:
    """TLS (and mTLS with a client cert) credentials, or None for plaintext."""
    if not (conn.get("tls") or conn.get("tls_ca") or conn.get("tls_cert")):
        return None

    def read(path: str) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(conn.get("tls_ca", "")),
        private_key=read(conn.get("tls_key", "")),
        certificate_chain=read(conn.get("tls_cert", "")),
    )


def channel_options(settings: WorkerSettings) -> list[tuple[str, Any]]:
    """Keepalive (so a dead peer is noticed in seconds) and message size limits."""
    return [
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.ping_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # The agent does its own reconnect backoff; keep gRPC's short.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def default_state_dir() -> Path:
    """~/.spool when the home directory is writable, else ./.spool."""
    home = Path.home() / ".spool"
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    return Path(".spool").resolve()


class WorkerIdentity:
    """A worker id persisted under the state dir, locked while this process runs.

    The first worker on a host gets `worker-id`; a second one running at the
    same time (the first holds the lock) gets `worker-id.1`, and so on, so
    several workers on one machine keep distinct, stable ids across restarts.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock_file: Any = None

    def acquire(self) -> str:
        """Return this process's id, creating and locking its file."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = self.state_dir / ("worker-id" if n == 0 else f"worker-id.{n}")
            f = open(path, "a+")  # noqa: SIM115 - kept open to hold the lock
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            wid = f.read().strip()
            if not wid:
                wid = str(uuid.uuid4())
                f.truncate(0)
                f.write(wid + "\n")
                f.flush()
            self._lock_file = f
            return wid
        raise RuntimeError(f"no free worker-id file under {self.state_dir}")

    def release(self) -> None:
        """Drop the lock (the id stays on disk for the next start)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
