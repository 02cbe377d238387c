"""API keys, tenants and roles: who is calling, and may they call this service.

A key is bound to a tenant and a role. Client keys may call JobService and
BlobService; worker keys may call WorkerService and BlobService; health and
reflection are open. Handlers read the caller with `current_principal()`.

Keys come from a file (`SPOOL_API_KEYS_FILE`, JSON or TOML):

    {"sk-acme-1": {"tenant": "acme", "role": "client"},
     "wk-fleet-1": {"tenant": "acme", "role": "worker"}}

    ["sk-acme-1"]
    tenant = "acme"
    role = "client"

or inline (`SPOOL_API_KEYS="sk-acme-1:acme:client,wk-fleet-1:acme:worker"`).
With auth off every caller is tenant "default" with role "admin" (any service).

A worker key's workers run only its tenant's jobs; a worker key of tenant "*"
is a shared fleet key (its workers run every tenant's jobs).
"""

from __future__ import annotations

import contextvars
import hmac
import json
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from control.errors import PermissionDenied, Unauthenticated, abort
from control.interceptors import ScopeInterceptor

CLIENT = "client"
WORKER = "worker"
ADMIN = "admin"
ROLES = (CLIENT, WORKER)
DEFAULT_TENANT = "default"
#: the tenant of a shared fleet's worker keys: their workers run every tenant's jobs
FLEET_TENANT = "*"

# Which roles may call each service; services not listed are open to anyone.
SERVICE_ROLES: dict[str, frozenset[str]] = {
    "spool.v1.JobService": frozenset({CLIENT}),
    "spool.v1.BlobService": frozenset({CLIENT, WORKER}),
    "spool.v1.WorkerService": frozenset({WORKER}),
}
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    tenant: str
    role: str

    def may_call(self, service: str) -> bool:
        """True when this caller's role may use `service` (full name, e.g. spool.v1.JobService)."""
        if self.role == ADMIN:
            return True
        roles = SERVICE_ROLES.get(service)
        return roles is None or self.role in roles

    @property
    def owner(self) -> str:
        """Who registers a worker id with this key ("<tenant>/<role>")."""
        return f"{self.tenant}/{self.role}"

    @property
    def job_tenants(self) -> tuple[str, ...] | None:
        """The tenants whose jobs a worker with this key may run; None: all (a shared fleet)."""
        if self.role == ADMIN or self.tenant == FLEET_TENANT:
            return None
        return (self.tenant,)


ANONYMOUS = Principal(DEFAULT_TENANT, ADMIN)

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "spool_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by the auth interceptor)."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("no principal for this call")
    return principal


class KeyStore:
    """API keys → principals, looked up in constant time per key."""

    def __init__(self, keys: Mapping[str, Principal]) -> None:
        self._keys = [(k.encode(), p) for k, p in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str) -> Principal | None:
        """The principal of `key`, or None. Compares against every key, never stops early."""
        candidate = key.encode()
        found = None
        for stored, principal in self._keys:
            if hmac.compare_digest(stored, candidate):
                found = principal
        return found


def _principal_from(key: str, entry: Any) -> Principal:
    if not isinstance(entry, Mapping) or not entry.get("tenant"):
        raise ValueError(f"API key {key[:4]}…: needs a tenant")
    role = entry.get("role", CLIENT)
    if role not in ROLES:
        raise ValueError(f"API key {key[:4]}…: role must be one of {ROLES}, not {role!r}")
    if entry["tenant"] == FLEET_TENANT and role != WORKER:
        raise ValueError(f"API key {key[:4]}…: tenant {FLEET_TENANT!r} is for worker keys only")
    return Principal(str(entry["tenant"]), role)


def parse_keys_file(path: str | Path) -> dict[str, Principal]:
    """Read a JSON or TOML keys file (see the module docstring)."""
    text = Path(path).read_text()
    data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    if "keys" in data and isinstance(data["keys"], Mapping):
        data = data["keys"]
    return {key: _principal_from(key, entry) for key, entry in data.items()}


def parse_keys_env(text: str) -> dict[str, Principal]:
    """Parse `key:tenant:role,key:tenant:role` (role defaults to client)."""
    keys = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, rest = item.partition(":")
        tenant, _, role = rest.partition(":")
        keys[key] = _principal_from(key, {"tenant": tenant, "role": role or CLIENT})
    return keys


def load_keys(keys_file: str = "", keys_env: str = "") -> KeyStore:
    """All configured keys: the file's, then the inline ones."""
    keys: dict[str, Principal] = {}
    if keys_file:
        keys.update(parse_keys_file(keys_file))
    if keys_env:
        keys.update(parse_keys_env(keys_env))
    return KeyStore(keys)


def _bearer(metadata: Any) -> str | None:
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def service_of(method: str) -> str:
    """`/spool.v1.JobService/Submit` → `spool.v1.JobService`."""
    return method.lstrip("/").split("/", 1)[0]


class AuthInterceptor(ScopeInterceptor):
    """Authenticates the caller, checks its role against the service, sets the principal."""

    def __init__(self, keys: KeyStore | None) -> None:
        #: None means auth is off: everyone is ANONYMOUS.
        self._keys = keys

    @asynccontextmanager
    async def scope(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Run the handler as the caller, or abort with UNAUTHENTICATED/PERMISSION_DENIED."""
        service = service_of(details.method)
        if self._keys is None:
            principal: Principal | None = ANONYMOUS
        elif service.startswith(OPEN_SERVICES):
            principal = None
        else:
            key = _bearer(context.invocation_metadata())
            if key is None:
                await abort(context, Unauthenticated("missing authorization: Bearer <key>"))
            principal = self._keys.lookup(key or "")
            if principal is None:
                await abort(context, Unauthenticated("unknown API key"))
            elif not principal.may_call(service):
                await abort(
                    context,
                    PermissionDenied(f"a {principal.role} key may not call {service}"),
                )
        token = _principal.set(principal)
        try:
            yield
        finally:
            _principal.reset(token)
