"""Settings of the control plane: one dataclass, filled from the environment and flags.

Every field names its environment variable and help text in its metadata, so
`spool-control --help` documents all of them and a flag exists for each
(`--lease-s` for `lease_s`, …) without a second list to keep in step. To add a
setting for your area, add a field with a default and `_opt("SPOOL_…", "help")`.

Durations are seconds (fields ending in `_s`) and accept suffixes: `250ms`,
`30s`, `5m`, `12h`, `7d`. Booleans accept on/off, true/false, yes/no, 1/0.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_duration_s(text: str) -> float:
    """Parse `250ms`, `30s`, `5m`, `12h`, `7d` or a bare number of seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 12h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]


def parse_bool(text: str) -> bool:
    """Parse on/off, true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use on or off)")


def _opt(env: str, help: str) -> dict[str, str]:
    return {"env": env, "help": help}


@dataclass
class Settings:
    """Everything a control plane process is configured with."""

    listen: str = field(
        default="127.0.0.1:50051",
        metadata=_opt("SPOOL_LISTEN", "gRPC listen address host:port (port 0 picks a free one)"),
    )
    database_url: str = field(
        default="",
        metadata=_opt(
            "SPOOL_DATABASE_URL",
            "postgresql://user:pass@host:port/db; empty: embedded Postgres in the data dir",
        ),
    )
    data_dir: str = field(
        default="./.spool",
        metadata=_opt("SPOOL_DATA_DIR", "directory for the embedded Postgres (pg/) and blobs"),
    )
    auth: bool = field(
        default=False,
        metadata=_opt("SPOOL_AUTH", "on: require API keys (authorization: Bearer <key>)"),
    )
    api_keys_file: str = field(
        default="",
        metadata=_opt(
            "SPOOL_API_KEYS_FILE",
            'JSON or TOML file mapping key -> {tenant, role}; role "client" or "worker"',
        ),
    )
    api_keys: str = field(
        default="",
        metadata=_opt("SPOOL_API_KEYS", "inline keys: key:tenant:role,key:tenant:role"),
    )
    reflection: bool = field(
        default=True,
        metadata=_opt("SPOOL_REFLECTION", "serve gRPC server reflection (off in production)"),
    )
    retention_s: float = field(
        default=7 * 86400.0,
        metadata=_opt("SPOOL_RETENTION", "delete terminal jobs finished longer ago than this"),
    )
    sweep_interval_s: float = field(
        default=60.0,
        metadata=_opt("SPOOL_SWEEP_INTERVAL", "how often the retention sweeper runs"),
    )
    default_max_attempts: int = field(
        default=3,
        metadata=_opt("SPOOL_DEFAULT_MAX_ATTEMPTS", "attempts of a job submitted with 0"),
    )
    shutdown_grace_s: float = field(
        default=10.0,
        metadata=_opt("SPOOL_SHUTDOWN_GRACE", "time in-flight RPCs get on SIGTERM"),
    )
    # Sized for a small machine: beyond the pool, a burst of requests waits for a
    # connection instead of opening (and closing) new ones, which costs more than
    # the queries themselves; Postgres on a few cores runs no faster with more.
    db_pool_size: int = field(
        default=20,
        metadata=_opt("SPOOL_DB_POOL_SIZE", "database connections kept by the pool"),
    )
    db_dispatch_pool_size: int = field(
        default=4,
        metadata=_opt(
            "SPOOL_DB_DISPATCH_POOL_SIZE",
            "connections kept for dispatch alone (claims, worker outcomes, leases; 0: share)",
        ),
    )
    db_max_overflow: int = field(
        default=5,
        metadata=_opt("SPOOL_DB_MAX_OVERFLOW", "extra connections the pool may open under load"),
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_opt("SPOOL_MAX_MESSAGE_BYTES", "largest gRPC message sent or received"),
    )
    keepalive_s: float = field(
        default=20.0,
        metadata=_opt("SPOOL_KEEPALIVE", "interval of HTTP/2 keepalive pings to clients"),
    )
    keepalive_timeout_s: float = field(
        default=10.0,
        metadata=_opt("SPOOL_KEEPALIVE_TIMEOUT", "a peer silent this long after a ping is dead"),
    )
    # Worker streams (B2: control/services/dispatch.py, leases.py).
    lease_s: float = field(
        default=15.0,
        metadata=_opt("SPOOL_LEASE_S", "an attempt whose worker stops renewing is requeued after"),
    )
    heartbeat_s: float = field(
        default=3.0,
        metadata=_opt("SPOOL_HEARTBEAT_S", "how often workers heartbeat (told in Welcome)"),
    )
    cancel_grace_s: float = field(
        default=10.0,
        metadata=_opt("SPOOL_CANCEL_GRACE_S", "a cancelled handler is stopped by force after this"),
    )
    retry_backoff_base_s: float = field(
        default=1.0,
        metadata=_opt("SPOOL_RETRY_BACKOFF_BASE", "first retry delay (doubles, jittered)"),
    )
    retry_backoff_max_s: float = field(
        default=60.0,
        metadata=_opt("SPOOL_RETRY_BACKOFF_MAX", "longest retry delay"),
    )
    # Blobs (C2: control/blobstore.py, services/blobs.py).
    blob_dir: str = field(
        default="",
        metadata=_opt("SPOOL_BLOB_DIR", "where blob content is stored; empty: <data_dir>/blobs"),
    )
    blob_quota_bytes: int = field(
        default=10 * 1024**3,
        metadata=_opt(
            "SPOOL_BLOB_QUOTA_BYTES", "bytes of blobs each tenant may store (0: no limit)"
        ),
    )
    blob_gc_interval_s: float = field(
        default=300.0,
        metadata=_opt("SPOOL_BLOB_GC_INTERVAL", "how often unreferenced old blobs are deleted"),
    )
    tls_cert_file: str = field(
        default="",
        metadata=_opt("SPOOL_TLS_CERT", "PEM server certificate (chain); with the key, serve TLS"),
    )
    tls_key_file: str = field(
        default="",
        metadata=_opt("SPOOL_TLS_KEY", "PEM private key of the server certificate"),
    )
    tls_client_ca_file: str = field(
        default="",
        metadata=_opt(
            "SPOOL_TLS_CLIENT_CA", "PEM CA bundle; when set, clients must present a cert (mTLS)"
        ),
    )
    # Metrics (control/metrics.py). Off by default; `make run` and compose turn it on.
    metrics_port: int = field(
        default=0,
        metadata=_opt(
            "SPOOL_METRICS_PORT", "serve Prometheus /metrics on this port (0: off; e.g. 9464)"
        ),
    )
    metrics_addr: str = field(
        default="127.0.0.1",
        metadata=_opt("SPOOL_METRICS_ADDR", "bind address of /metrics (0.0.0.0: all interfaces)"),
    )
    metrics_refresh_s: float = field(
        default=5.0,
        metadata=_opt("SPOOL_METRICS_REFRESH", "how often queue gauges are read from Postgres"),
    )
    log_format: str = field(
        default="text",
        metadata=_opt("SPOOL_LOG_FORMAT", "json (one JSON object a line) or text (key=value)"),
    )
    log_level: str = field(
        default="INFO",
        metadata=_opt("SPOOL_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    )

    @property
    def host(self) -> str:
        """The host part of `listen`."""
        return self.listen.rsplit(":", 1)[0]

    def replace(self, **overrides: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from environment variables (`SPOOL_*`), then `overrides` on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata.get("env", ""))
            if raw is not None and raw != "":
                values[f.name] = convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def convert(f: dataclasses.Field[Any], raw: str) -> Any:
    """Turn a string from the environment or a flag into the field's type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            return parse_bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return parse_duration_s(raw) if f.name.endswith("_s") else float(raw)
    except ValueError as exc:
        raise ValueError(f"{f.metadata.get('env', f.name)}: {exc}") from None
    return raw


def settings_fields() -> list[dataclasses.Field[Any]]:
    """The fields of Settings, in order (for building flags and help)."""
    return list(dataclasses.fields(Settings))
