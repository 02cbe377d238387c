"""Strategies of absurd values and the checks every fuzzed call must pass.

`scaled(n)`: how many examples a test runs (n by default, 10·n with SPOOL_SLOW=1).
A call is *clean* when it is OK or one of CLEAN_CODES, and an INVALID_ARGUMENT
names a field in its BadRequest details. Never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

from control.db import Database
from spool.v1 import job_pb2

SLOW = os.environ.get("SPOOL_SLOW", "") == "1"

CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
OK = grpc.StatusCode.OK


def scaled(n: int) -> int:
    """Examples for a test: `n`, or ten times as many under SPOOL_SLOW=1."""
    return n * 10 if SLOW else n


def check_error(err: grpc.RpcError, what: str = "") -> grpc.StatusCode:
    """Assert `err` is a clean status (see the module docstring) and return its code."""
    code = err.code()
    details = err.details() or ""
    assert code in CLEAN_CODES, f"{what}: {code} {details!r}"
    assert "Traceback" not in details and "Error'>" not in details, details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field_of(err), f"{what}: INVALID_ARGUMENT names no field: {details!r}"
    return code


def field_of(err: grpc.RpcError) -> str:
    """The field of the first BadRequest violation ('' when there is none)."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field if bad.field_violations else ""
    return ""


COUNT_SQL = sa.text(
    "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_events),"
    " (SELECT count(*) FROM blobs), (SELECT count(*) FROM workers),"
    " (SELECT coalesce(sum(last_seq), 0) FROM jobs)"
)


async def counts(db: Database) -> tuple[int, ...]:
    """(jobs, job_events, blobs, workers, sum of last_seq): what a rejected call must not change."""
    async with db.autocommit() as conn:
        return tuple(int(v) for v in (await conn.execute(COUNT_SQL)).one())


# ---------------------------------------------------------------- values

_ODD = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\u202e",
    "😀",
    "\ufeff",
    "\U0010ffff",
    "%s%n",
    "'; DROP TABLE jobs; --",
    "\n",
    "\\",
    '"',
    "null",
    "NaN",
]
#: strings: random unicode (never lone surrogates: protobuf cannot encode them), odd ones, long ones
odd_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
    st.sampled_from(_ODD),
    st.builds(
        operator.mul,
        st.sampled_from(["a", "\x00", "é", "😀"]),
        st.sampled_from([127, 128, 129, 199, 200, 201, 256, 257, 1000, 1001, 1025, 4097, 70_000]),
    ),
)
small_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8), st.sampled_from(_ODD)
)
#: "debug.noop" often, so that some specs are valid
job_types = st.one_of(st.just("debug.noop"), st.just("t"), odd_text)

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
int32s = st.one_of(
    st.integers(*INT32),
    st.sampled_from([0, 1, -1, 100, 101, -100, -101, 1000, 1001, *INT32]),
)
int64s = st.one_of(st.integers(*INT64), st.sampled_from([0, 1, -1, 2**53 + 1, *INT64]))
small_ints = st.integers(-3, 5)

durations = st.one_of(
    st.none(),
    st.builds(duration_pb2.Duration, seconds=st.integers(-10, 10**6), nanos=st.integers(0, 999)),
    st.builds(duration_pb2.Duration, seconds=int64s, nanos=int32s),
    st.sampled_from(
        [
            duration_pb2.Duration(seconds=300_000_000_000),
            duration_pb2.Duration(seconds=7 * 86400),
            duration_pb2.Duration(seconds=7 * 86400, nanos=1),
            duration_pb2.Duration(seconds=-1),
            duration_pb2.Duration(seconds=1, nanos=-1),
        ]
    ),
)
timestamps = st.one_of(
    st.none(),
    st.builds(timestamp_pb2.Timestamp, seconds=st.integers(0, 2_000_000_000)),
    st.builds(timestamp_pb2.Timestamp, seconds=int64s, nanos=int32s),
    st.sampled_from(
        [
            timestamp_pb2.Timestamp(seconds=253_402_300_799),
            timestamp_pb2.Timestamp(seconds=253_402_300_800),
            timestamp_pb2.Timestamp(seconds=-62_135_596_800),
            timestamp_pb2.Timestamp(seconds=-62_135_596_801),
            timestamp_pb2.Timestamp(seconds=10**12),
            timestamp_pb2.Timestamp(seconds=0, nanos=-1),
        ]
    ),
)

_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0]),
)
json_values = st.recursive(
    st.none() | st.booleans() | _floats | st.integers(-(2**53), 2**53) | small_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(small_text, inner, max_size=4),
    max_leaves=20,
)


def nested(depth: int) -> dict[str, Any]:
    """{"d": {"d": ... {}}} `depth` levels deep."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"d": value}
    return value


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """A Struct holding `data` (whatever it holds)."""
    s = struct_pb2.Struct()
    s.update(data)
    return s


structs = st.one_of(
    st.none(),
    st.dictionaries(small_text, json_values, max_size=5).map(to_struct),
    st.sampled_from([5, 31, 32, 33]).map(nested).map(to_struct),
    st.builds(lambda n: to_struct({"blob": "x" * n}), st.sampled_from([10, 1024 * 1024 + 1])),
)
label_maps = st.one_of(
    st.dictionaries(small_text, small_text, max_size=3),
    st.dictionaries(odd_text, odd_text, max_size=2),
    st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.sampled_from([64, 65])),
)
uris = st.one_of(
    st.sampled_from(["https://example.com/x", "file:///tmp/x", "blob:sha256:" + "0" * 64]),
    odd_text,
    odd_text.map(lambda t: "https://x/" + t),
)
job_ids = st.one_of(
    st.uuids().map(str),
    odd_text,
    st.sampled_from(["00000000-0000-0000-0000-000000000000", "0" * 36, "{" + "0" * 32 + "}"]),
)
specs = st.builds(
    job_pb2.JobSpec,
    type=job_types,
    params=structs,
    inputs=st.lists(uris, max_size=2),
    priority=st.one_of(small_ints, int32s),
    labels=label_maps,
    worker_selector=label_maps,
    concurrency_key=st.one_of(st.just(""), odd_text),
    concurrency_limit=st.one_of(small_ints, int32s),
    min_start_interval=durations,
    not_before=timestamps,
    timeout=durations,
    max_attempts=st.one_of(small_ints, int32s),
    request_id=st.one_of(st.just(""), st.sampled_from(["r1", "r2", "r3"]), odd_text),
)
