"""Credits on the worker stream: announced incrementally, freed ones in batches."""

from __future__ import annotations

from worker._config import WorkerSettings
from worker._stream import Stream


def _stream() -> Stream:
    stream = Stream(WorkerSettings(server="127.0.0.1:1", worker_id="w"), events=None)  # type: ignore[arg-type]
    stream.connected = True
    return stream


def _announced(stream: Stream) -> list[int]:
    return [m.ready.credits for out in stream._outbox for m in out.msgs]


def test_capacity_is_announced_once_and_only_what_is_new() -> None:
    s = _stream()
    s.offer(8, min_batch=2)
    s.offer(8, min_batch=2)
    assert _announced(s) == [8]


def test_a_lone_freed_credit_waits_while_control_holds_credits() -> None:
    s = _stream()
    s.offer(8, min_batch=2)
    s._credits = 7  # control assigned one job and still holds 7 credits
    s.offer(8, min_batch=2)  # that job finished: one slot free again
    assert _announced(s) == [8]
    s.offer(9, min_batch=2)  # a second one: a batch of 2
    assert _announced(s) == [8, 2]


def test_with_no_credit_outstanding_any_capacity_goes_out_at_once() -> None:
    s = _stream()
    s.offer(8, min_batch=4)
    s._credits = 0  # control used every credit
    s.offer(1, min_batch=4)
    assert _announced(s) == [8, 1]


def test_nothing_is_announced_without_a_stream() -> None:
    s = _stream()
    s.connected = False
    s.offer(8)
    assert _announced(s) == []
