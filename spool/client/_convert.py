"""Python values ⇄ protobuf messages: job specs, states, durations, times, dicts."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from spool.v1 import job_pb2

#: inputs that are already URIs (blob:sha256:…, https://…, file://…) are sent as they are
_URI_RE = re.compile(r"^(blob:sha256:[0-9a-f]{64}|[a-zA-Z][a-zA-Z0-9+.-]*://.*)$")

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELED}
)
_STATE_PREFIX = "JOB_STATE_"


def is_uri(text: str) -> bool:
    """True for a blob URI or anything with a scheme://; False for a local path."""
    return bool(_URI_RE.match(text))


def parse_state(value: str | int) -> int:
    """`queued`, `QUEUED`, `JOB_STATE_QUEUED` or the enum number → the enum number."""
    if isinstance(value, int):
        return value
    name = value.strip().upper()
    if not name.startswith(_STATE_PREFIX):
        name = _STATE_PREFIX + name
    try:
        number = job_pb2.JobState.Value(name)
    except ValueError:
        names = ", ".join(state_name(s) for s in range(1, 6))
        raise ValueError(f"unknown state {value!r} (one of {names})") from None
    if number == job_pb2.JOB_STATE_UNSPECIFIED:
        raise ValueError(f"unknown state {value!r}")
    return number


def state_name(state: int) -> str:
    """The enum number → `queued`, `running`, … (the CLI's and the database's spelling)."""
    name = job_pb2.JobState.Name(job_pb2.JobState.ValueType(state))
    return name.removeprefix(_STATE_PREFIX).lower()


def to_duration(value: float | dt.timedelta | None) -> duration_pb2.Duration | None:
    """Seconds or a timedelta → Duration (None stays None)."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def to_timestamp(value: float | dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """Unix seconds or an aware datetime → Timestamp (None stays None)."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("not_before must be timezone-aware")
        ts.FromDatetime(value.astimezone(dt.UTC))
    else:
        ts.FromNanoseconds(round(float(value) * 1e9))
    return ts


def to_struct(params: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A dict of JSON values → Struct."""
    s = struct_pb2.Struct()
    if params:
        s.update(dict(params))
    return s


def build_spec(
    type: str,
    *,
    params: Mapping[str, Any] | None = None,
    inputs: list[str] | tuple[str, ...] = (),
    priority: int = 0,
    labels: Mapping[str, str] | None = None,
    worker_selector: Mapping[str, str] | None = None,
    concurrency_key: str | None = None,
    concurrency_limit: int = 0,
    min_start_interval: float | dt.timedelta | None = None,
    not_before: float | dt.datetime | None = None,
    timeout: float | dt.timedelta | None = None,
    max_attempts: int = 0,
    request_id: str | None = None,
) -> job_pb2.JobSpec:
    """A JobSpec from keyword arguments (durations in seconds or timedeltas)."""
    spec = job_pb2.JobSpec(
        type=type,
        params=to_struct(params),
        inputs=list(inputs),
        priority=priority,
        labels=dict(labels or {}),
        worker_selector=dict(worker_selector or {}),
        concurrency_key=concurrency_key or "",
        concurrency_limit=concurrency_limit,
        max_attempts=max_attempts,
        request_id=request_id or "",
    )
    for name, value in (
        ("min_start_interval", to_duration(min_start_interval)),
        ("timeout", to_duration(timeout)),
        ("not_before", to_timestamp(not_before)),
    ):
        if value is not None:
            getattr(spec, name).CopyFrom(value)
    return spec


def to_dict(message: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict (proto field names, enums by name, defaults kept)."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
