"""Connection options of the client: server, token, TLS, timeouts, retries, keepalive."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"
#: the largest message the client sends or accepts (the server's default limit)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: keepalive pings on an idle connection; a dead control plane is noticed within
#: KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS even while a watch is quiet
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: how soon a broken connection is redialled; the default (1 s, growing) would
#: add seconds to every reconnect after a control plane restart
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 2_000

_TRUE = {"1", "true", "yes", "on"}


@dataclass
class ClientOptions:
    """How a client reaches the control plane. Unset fields fall back to the environment."""

    #: host:port (SPOOL_SERVER)
    server: str = ""
    #: API key sent as `authorization: Bearer <token>` (SPOOL_TOKEN)
    token: str = ""
    #: use TLS (SPOOL_TLS)
    tls: bool | None = None
    #: CA bundle (PEM) to verify the server; empty: the system roots (SPOOL_TLS_CA)
    tls_ca: str = ""
    #: client certificate and key (PEM) for mTLS (SPOOL_TLS_CERT, SPOOL_TLS_KEY)
    tls_cert: str = ""
    tls_key: str = ""
    #: deadline of each unary call, in seconds
    timeout_s: float = 30.0
    #: how long UNAVAILABLE is retried (exponential backoff) before giving up, in seconds
    retry_budget_s: float = 30.0
    #: first retry delay; doubles up to `retry_max_delay_s`
    retry_initial_delay_s: float = 0.1
    retry_max_delay_s: float = 2.0
    #: how long a watch keeps reconnecting while the control plane is unreachable, in seconds
    reconnect_budget_s: float = 120.0

    def resolved(self) -> ClientOptions:
        """A copy with empty fields filled from SPOOL_* environment variables."""
        env = os.environ
        tls = self.tls
        if tls is None:
            tls = env.get("SPOOL_TLS", "").strip().lower() in _TRUE
        return ClientOptions(
            server=self.server or env.get("SPOOL_SERVER", "") or DEFAULT_SERVER,
            token=self.token or env.get("SPOOL_TOKEN", ""),
            tls=tls,
            tls_ca=self.tls_ca or env.get("SPOOL_TLS_CA", ""),
            tls_cert=self.tls_cert or env.get("SPOOL_TLS_CERT", ""),
            tls_key=self.tls_key or env.get("SPOOL_TLS_KEY", ""),
            timeout_s=self.timeout_s,
            retry_budget_s=self.retry_budget_s,
            retry_initial_delay_s=self.retry_initial_delay_s,
            retry_max_delay_s=self.retry_max_delay_s,
            reconnect_budget_s=self.reconnect_budget_s,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token when one is set."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def channel_options() -> list[tuple[str, Any]]:
    """gRPC channel arguments: message sizes, keepalive, quick reconnects."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def _read(path: str) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


def open_channel(options: ClientOptions) -> grpc.aio.Channel:
    """An aio channel to `options.server` (TLS when asked). The caller closes it."""
    if options.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(options.tls_ca),
            private_key=_read(options.tls_key),
            certificate_chain=_read(options.tls_cert),
        )
        return grpc.aio.secure_channel(options.server, credentials, options=channel_options())
    return grpc.aio.insecure_channel(options.server, options=channel_options())
