"""Checks of values that cross the edge: small named functions raising InvalidArgument.

Every function takes the field's path first (``"job.labels"``, ``"hello.name"``)
and raises `control.errors.InvalidArgument(field, description)` when the value
is not acceptable, so the caller gets INVALID_ARGUMENT naming the field. They
return the checked (sometimes converted) value:

    job_type = validate.text("job.type", spec.type, max_len=200, required=True)
    timeout_ms = validate.duration_ms("job.timeout", spec.timeout, max_ms=validate.MAX_TIMEOUT_MS)
    params = validate.struct("job.params", spec.params)

What they guard against is what Postgres and the rest of the control plane
cannot store or compute with: NUL characters (text and jsonb refuse them),
NaN and ±Infinity (not JSON), timestamps outside years 1-9999 (Python's
datetime) and durations that overflow a timestamp once added to "now".

`json_safe` is the forgiving sibling for values the control plane must keep
even when they are odd (a handler's result or progress): it replaces what
cannot be stored and says where.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from control.errors import InvalidArgument

# ---------------------------------------------------------------- documented limits
# (docs/control-plane.md has the table; keep the two in step)

#: a job attempt's timeout
MAX_TIMEOUT = timedelta(days=7)
MAX_TIMEOUT_MS = int(MAX_TIMEOUT.total_seconds() * 1000)
#: the minimum interval between two starts of jobs sharing a concurrency key
MAX_MIN_START_INTERVAL = timedelta(days=1)
MAX_MIN_START_INTERVAL_MS = int(MAX_MIN_START_INTERVAL.total_seconds() * 1000)
#: how far ahead `not_before` may be
MAX_NOT_BEFORE_AHEAD = timedelta(days=365)
#: nesting of objects/arrays inside a JSON value (params, results)
MAX_JSON_DEPTH = 32
#: serialized size of a JSON value (params)
MAX_JSON_BYTES = 1024 * 1024
#: entries and key/value lengths of a label map
MAX_LABELS = 64
MAX_LABEL_KEY_LEN = 128
MAX_LABEL_VALUE_LEN = 256
#: an int32 / int64 protobuf field
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

#: the range of google.protobuf.Timestamp (and of Python's datetime): 0001-01-01 .. 9999-12-31
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
#: the range of google.protobuf.Duration: about ±10,000 years
DURATION_MAX_SECONDS = 315_576_000_000

_NUL = "\x00"


# ---------------------------------------------------------------- text


def text(
    field: str,
    value: str,
    *,
    max_len: int,
    required: bool = False,
    strip: bool = False,
) -> str:
    """A string without NUL and at most `max_len` characters (non-empty when `required`).

    With `strip`, surrounding whitespace is removed first (and the stripped
    value is returned and checked).
    """
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a string")
    if strip:
        value = value.strip()
    if required and not value:
        raise InvalidArgument(field, "required")
    if len(value) > max_len:
        raise InvalidArgument(field, f"at most {max_len} characters")
    if _NUL in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def text_list(field: str, values: Any, *, max_items: int, max_len: int) -> list[str]:
    """At most `max_items` strings, each checked like `text` (errors name ``field[i]``)."""
    items = list(values)
    if len(items) > max_items:
        raise InvalidArgument(field, f"at most {max_items} entries")
    return [text(f"{field}[{i}]", v, max_len=max_len) for i, v in enumerate(items)]


def label_map(
    field: str,
    values: Mapping[str, str],
    *,
    max_entries: int = MAX_LABELS,
    max_key_len: int = MAX_LABEL_KEY_LEN,
    max_value_len: int = MAX_LABEL_VALUE_LEN,
) -> dict[str, str]:
    """A str→str map: at most `max_entries`, keys 1..max_key_len, values ≤ max_value_len, no NUL."""
    if len(values) > max_entries:
        raise InvalidArgument(field, f"at most {max_entries} entries")
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key or len(key) > max_key_len:
            raise InvalidArgument(field, f"keys are 1..{max_key_len} characters")
        if _NUL in key:
            raise InvalidArgument(field, "keys must not contain NUL characters")
        if not isinstance(value, str) or len(value) > max_value_len:
            raise InvalidArgument(f"{field}[{key}]", f"values are at most {max_value_len} chars")
        if _NUL in value:
            raise InvalidArgument(f"{field}[{key}]", "must not contain NUL characters")
        out[key] = value
    return out


def job_id(field: str, value: str) -> uuid.UUID:
    """A UUID given as text (a job id), else INVALID_ARGUMENT "must be a UUID"."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(field, "must be a UUID") from None


# ---------------------------------------------------------------- numbers


def integer(field: str, value: int, *, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(field, f"must be between {lo} and {hi}")
    return value


def number(field: str, value: float, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite number in [lo, hi] (NaN and ±Infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field, "must be a number")
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number (not NaN or Infinity)")
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be between {lo:g} and {hi:g}")
    return float(value)


# ---------------------------------------------------------------- durations


def seconds(field: str, value: float, *, max_s: float, min_s: float = 0.0) -> float:
    """A duration in seconds given as a number: finite and in [min_s, max_s]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number of seconds")
    if value < min_s:
        raise InvalidArgument(field, f"must be at least {min_s:g}s")
    if value > max_s:
        raise InvalidArgument(field, f"at most {max_s:g}s")
    return float(value)


def duration_ms(
    field: str, value: duration_pb2.Duration | None, *, max_ms: int, allow_negative: bool = False
) -> int:
    """A google.protobuf.Duration as whole milliseconds in [0, max_ms] (unset or zero: 0).

    Refuses a Duration that is not well-formed (seconds beyond ±10,000 years,
    nanos out of range or of the other sign), a negative one (unless
    `allow_negative`) and one longer than `max_ms`.
    """
    if value is None:
        return 0
    s, n = value.seconds, value.nanos
    if abs(s) > DURATION_MAX_SECONDS or abs(n) > 999_999_999 or (s and n and (s < 0) != (n < 0)):
        raise InvalidArgument(field, "not a valid Duration")
    ms = s * 1000 + int(n / 1_000_000)
    if ms < 0 and not allow_negative:
        raise InvalidArgument(field, "must not be negative")
    if abs(ms) > max_ms:
        raise InvalidArgument(field, f"at most {_human_ms(max_ms)}")
    return ms


def _human_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# ---------------------------------------------------------------- timestamps


def timestamp(field: str, value: timestamp_pb2.Timestamp) -> datetime:
    """A google.protobuf.Timestamp as an aware UTC datetime; years 1..9999 only.

    Refuses seconds outside 0001-01-01..9999-12-31 and nanos outside
    [0, 999,999,999], so the conversion itself can never overflow.
    """
    s, n = value.seconds, value.nanos
    if not TIMESTAMP_MIN_SECONDS <= s <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgument(field, "must be between years 1 and 9999")
    if not 0 <= n <= 999_999_999:
        raise InvalidArgument(field, "nanos must be between 0 and 999999999")
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "must be between years 1 and 9999") from None


def epoch_seconds(field: str, value: float) -> datetime:
    """Seconds since 1970 (a float) as an aware UTC datetime; finite, years 1..9999 only."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number of seconds since 1970")
    if not TIMESTAMP_MIN_SECONDS <= value <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgument(field, "must be between years 1 and 9999")
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=value)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "must be between years 1 and 9999") from None


def not_after(field: str, value: datetime, limit: datetime, *, what: str = "") -> datetime:
    """`value` itself, unless it is later than `limit` (`what` describes the limit)."""
    if value > limit:
        raise InvalidArgument(field, f"must not be later than {what or limit.isoformat()}")
    return value


def not_before_time(
    field: str, value: timestamp_pb2.Timestamp, now: datetime | None = None
) -> datetime | None:
    """A job's `not_before`: unset or zero → None; else at most MAX_NOT_BEFORE_AHEAD from now.

    Any time in the past (back to year 1) is accepted: it means "now".
    """
    if not (value.seconds or value.nanos):
        return None
    when = timestamp(field, value)
    now = now or datetime.now(UTC)
    return not_after(field, when, now + MAX_NOT_BEFORE_AHEAD, what="1 year from now")


# ---------------------------------------------------------------- JSON values


def json_value(
    field: str,
    value: Any,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int | None = MAX_JSON_BYTES,
) -> Any:
    """A plain JSON value (dict/list/str/int/float/bool/None) Postgres can store as jsonb.

    Refuses NaN and ±Infinity anywhere, NUL in keys and strings, keys that are
    not strings, other types, nesting deeper than `max_depth` and a serialized
    size over `max_bytes` (None: no size limit). The error names the path,
    e.g. ``job.params.a.b[3]``.
    """
    _check_json(field, value, max_depth, 0)
    if max_bytes is not None:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
        if size > max_bytes:
            raise InvalidArgument(field, f"at most {max_bytes} bytes once serialized")
    return value


def _check_json(path: str, value: Any, max_depth: int, depth: int) -> None:
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(path, "NaN and Infinity are not JSON values")
        return
    if isinstance(value, str):
        if _NUL in value:
            raise InvalidArgument(path, "must not contain NUL characters")
        return
    if isinstance(value, Mapping | list | tuple):
        if depth >= max_depth:
            raise InvalidArgument(path, f"nested deeper than {max_depth} levels")
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidArgument(path, "object keys must be strings")
                if _NUL in key:
                    raise InvalidArgument(path, "object keys must not contain NUL characters")
                _check_json(f"{path}.{key}", item, max_depth, depth + 1)
        else:
            for i, item in enumerate(value):
                _check_json(f"{path}[{i}]", item, max_depth, depth + 1)
        return
    raise InvalidArgument(path, f"not a JSON value ({type(value).__name__})")


def struct(
    field: str,
    value: struct_pb2.Struct | None,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int | None = MAX_JSON_BYTES,
) -> dict[str, Any]:
    """A google.protobuf.Struct as a dict, checked like `json_value` (None/unset: {}).

    The Struct is walked before it is converted: json_format refuses NaN with a
    ValueError that would otherwise surface as INTERNAL.
    """
    if value is None:
        return {}
    _check_struct(field, value, max_depth, 0)
    data: dict[str, Any] = json_format.MessageToDict(value)
    if max_bytes is not None:
        size = len(json.dumps(data, separators=(",", ":")).encode())
        if size > max_bytes:
            raise InvalidArgument(field, f"at most {max_bytes} bytes once serialized")
    return data


def _check_struct(path: str, message: struct_pb2.Struct, max_depth: int, depth: int) -> None:
    if depth >= max_depth:
        raise InvalidArgument(path, f"nested deeper than {max_depth} levels")
    for key, item in message.fields.items():
        if _NUL in key:
            raise InvalidArgument(path, "object keys must not contain NUL characters")
        _check_value(f"{path}.{key}", item, max_depth, depth + 1)


def _check_value(path: str, value: struct_pb2.Value, max_depth: int, depth: int) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            raise InvalidArgument(path, "NaN and Infinity are not JSON values")
    elif kind == "string_value":
        if _NUL in value.string_value:
            raise InvalidArgument(path, "must not contain NUL characters")
    elif kind == "struct_value":
        _check_struct(path, value.struct_value, max_depth, depth)
    elif kind == "list_value":
        if depth >= max_depth:
            raise InvalidArgument(path, f"nested deeper than {max_depth} levels")
        for i, item in enumerate(value.list_value.values):
            _check_value(f"{path}[{i}]", item, max_depth, depth + 1)
    elif kind is None:
        raise InvalidArgument(path, "a Value with no kind set")


def json_safe(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> tuple[Any, list[str]]:
    """A copy of `value` that can always be stored as jsonb, and the paths that were changed.

    NaN and ±Infinity become None, NUL characters are removed from strings and
    keys, tuples become lists, non-string keys become strings, an integer too
    large for a double becomes None, containers nested deeper than `max_depth`
    become None, and any other type becomes its `str()`. Paths look like
    ``$.loss`` or ``$.items[3].name``; an empty list means nothing changed.
    """
    replaced: list[str] = []
    return _safe(value, "$", max_depth, 0, replaced), replaced


def _safe(value: Any, path: str, max_depth: int, depth: int, replaced: list[str]) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            replaced.append(path)
            return None
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        replaced.append(path)
        return None
    if isinstance(value, str):
        if _NUL in value:
            replaced.append(path)
            return value.replace(_NUL, "")
        return value
    if isinstance(value, Mapping | list | tuple):
        if depth >= max_depth:
            replaced.append(path)
            return None
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                clean_key = key if isinstance(key, str) else str(key)
                clean_key = clean_key.replace(_NUL, "")
                if clean_key != key:
                    replaced.append(f"{path}.{clean_key}")
                out[clean_key] = _safe(item, f"{path}.{clean_key}", max_depth, depth + 1, replaced)
            return out
        return [
            _safe(item, f"{path}[{i}]", max_depth, depth + 1, replaced)
            for i, item in enumerate(value)
        ]
    replaced.append(path)
    return str(value).replace(_NUL, "")
