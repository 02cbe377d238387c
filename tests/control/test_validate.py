"""control.validate: each check refuses what Postgres or the control plane cannot keep."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from control import validate
from control.errors import InvalidArgument


def _raises(field: str, fn, *args, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as err:
        fn(*args, **kwargs)
    assert err.value.field == field
    return err.value.description


def test_text() -> None:
    assert validate.text("f", " a ", max_len=3, strip=True) == "a"
    _raises("f", validate.text, "f", "a\x00b", max_len=10)
    _raises("f", validate.text, "f", "abcd", max_len=3)
    _raises("f", validate.text, "f", "  ", max_len=3, required=True, strip=True)
    assert validate.text("f", "", max_len=3) == ""
    assert validate.text_list("f", ["a", "b"], max_items=2, max_len=1) == ["a", "b"]
    _raises("f[1]", validate.text_list, "f", ["a", "\x00"], max_items=2, max_len=1)
    _raises("f", validate.text_list, "f", ["a", "b", "c"], max_items=2, max_len=1)


def test_label_map() -> None:
    assert validate.label_map("l", {"a": "b"}) == {"a": "b"}
    _raises("l", validate.label_map, "l", {"": "b"})
    _raises("l", validate.label_map, "l", {"a\x00": "b"})
    _raises("l[a]", validate.label_map, "l", {"a": "b\x00"})
    _raises("l[a]", validate.label_map, "l", {"a": "x" * 257})
    _raises("l", validate.label_map, "l", {str(i): "" for i in range(65)})


def test_numbers() -> None:
    assert validate.integer("n", 5, lo=0, hi=5) == 5
    _raises("n", validate.integer, "n", 6, lo=0, hi=5)
    _raises("n", validate.integer, "n", True, lo=0, hi=5)
    for bad in (math.nan, math.inf, -math.inf):
        _raises("x", validate.number, "x", bad)
        _raises("d", validate.seconds, "d", bad, max_s=60)
    _raises("d", validate.seconds, "d", 1e12, max_s=60)
    _raises("d", validate.seconds, "d", -1, max_s=60)
    assert validate.seconds("d", 60, max_s=60) == 60.0


def test_duration_ms() -> None:
    d = duration_pb2.Duration
    assert validate.duration_ms("t", None, max_ms=1000) == 0
    assert validate.duration_ms("t", d(seconds=1, nanos=500_000_000), max_ms=2000) == 1500
    assert validate.duration_ms("t", d(seconds=7 * 86400), max_ms=validate.MAX_TIMEOUT_MS) > 0
    _raises("t", validate.duration_ms, "t", d(seconds=300000000000), max_ms=validate.MAX_TIMEOUT_MS)
    _raises("t", validate.duration_ms, "t", d(seconds=-1), max_ms=1000)
    _raises("t", validate.duration_ms, "t", d(seconds=1, nanos=-1), max_ms=10_000)
    _raises("t", validate.duration_ms, "t", d(seconds=10**15), max_ms=10_000)
    _raises("t", validate.duration_ms, "t", d(nanos=2_000_000_000), max_ms=10_000)


def test_timestamps() -> None:
    ts = timestamp_pb2.Timestamp
    assert validate.timestamp("w", ts(seconds=0)) == datetime(1970, 1, 1, tzinfo=UTC)
    assert validate.timestamp("w", ts(seconds=validate.TIMESTAMP_MAX_SECONDS)).year == 9999
    assert validate.timestamp("w", ts(seconds=validate.TIMESTAMP_MIN_SECONDS)).year == 1
    _raises("w", validate.timestamp, "w", ts(seconds=validate.TIMESTAMP_MAX_SECONDS + 1))
    _raises("w", validate.timestamp, "w", ts(seconds=validate.TIMESTAMP_MIN_SECONDS - 1))
    _raises("w", validate.timestamp, "w", ts(seconds=0, nanos=-1))
    _raises("w", validate.timestamp, "w", ts(seconds=0, nanos=10**9))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert validate.not_before_time("nb", ts(), now) is None
    soon = ts(seconds=int((now + timedelta(days=300)).timestamp()))
    assert validate.not_before_time("nb", soon, now) is not None
    far = ts(seconds=int((now + timedelta(days=366)).timestamp()))
    _raises("nb", validate.not_before_time, "nb", far, now)
    assert validate.not_before_time("nb", ts(seconds=validate.TIMESTAMP_MIN_SECONDS), now)
    assert validate.epoch_seconds("u", 0.5).year == 1970
    for bad in (math.nan, math.inf, 1e20, -1e20):
        _raises("u", validate.epoch_seconds, "u", bad)


def test_json_value() -> None:
    ok = {"a": [1, 2.5, "x", None, True, {"b": {}}]}
    assert validate.json_value("p", ok) is ok
    assert _raises("p.a[1]", validate.json_value, "p", {"a": [1, math.nan]})
    _raises("p.a", validate.json_value, "p", {"a": math.inf})
    _raises("p.a", validate.json_value, "p", {"a": "\x00"})
    _raises("p", validate.json_value, "p", {"a\x00": 1})
    _raises("p", validate.json_value, "p", {1: 1})
    _raises("p", validate.json_value, "p", {"a": "x" * 100}, max_bytes=50)
    deep: dict = {}
    node = deep
    for _ in range(validate.MAX_JSON_DEPTH + 1):
        node["d"] = {}
        node = node["d"]
    assert "deeper" in _raises("p" + ".d" * validate.MAX_JSON_DEPTH, validate.json_value, "p", deep)
    _raises("p", validate.json_value, "p", object())


def test_struct() -> None:
    s = struct_pb2.Struct()
    s.update({"a": 1, "b": [1, "x"], "c": {"d": None}})
    assert validate.struct("p", s) == {"a": 1.0, "b": [1.0, "x"], "c": {"d": None}}
    for bad, field in [
        ({"a": math.nan}, "p.a"),
        ({"a": [math.inf]}, "p.a[0]"),
        ({"a": {"b": -math.inf}}, "p.a.b"),
        ({"a": "x\x00"}, "p.a"),
        ({"a\x00": 1}, "p"),
    ]:
        s = struct_pb2.Struct()
        s.update(bad)
        _raises(field, validate.struct, "p", s)
    empty_value = struct_pb2.Struct()
    empty_value.fields["a"].Clear()  # an entry whose Value has no kind
    _raises("p.a", validate.struct, "p", empty_value)
    assert validate.struct("p", None) == {}
    big = struct_pb2.Struct()
    big.update({"a": "x" * 100})
    _raises("p", validate.struct, "p", big, max_bytes=50)
    assert validate.struct("p", big, max_bytes=None) == {"a": "x" * 100}


def test_json_safe() -> None:
    clean, paths = validate.json_safe(
        {
            "loss": math.nan,
            "ok": 1.5,
            "items": [math.inf, "a\x00b", (1, 2)],
            "k\x00": 1,
            3: "three",
            "big": 10**400,
            "obj": object,
        }
    )
    assert clean["loss"] is None and clean["ok"] == 1.5
    assert clean["items"] == [None, "ab", [1, 2]]
    assert clean["k"] == 1 and clean["3"] == "three" and clean["big"] is None
    assert isinstance(clean["obj"], str)
    assert set(paths) == {"$.loss", "$.items[0]", "$.items[1]", "$.k", "$.3", "$.big", "$.obj"}
    validate.json_value("r", clean)  # storable
    assert validate.json_safe({"a": [1, "x"]}) == ({"a": [1, "x"]}, [])
    deep: list = []
    node = deep
    for _ in range(5):
        node.append([])
        node = node[0]
    clean, paths = validate.json_safe(deep, max_depth=3)
    assert clean == [[[None]]] and paths == ["$[0][0][0]"]


def test_job_id() -> None:
    assert str(validate.job_id("j", "00000000-0000-0000-0000-000000000001")).endswith("1")
    for bad in ("", "x", "\x00", "1" * 1000):
        _raises("j", validate.job_id, "j", bad)
