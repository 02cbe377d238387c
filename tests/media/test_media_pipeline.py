"""The bounded pipeline: flat memory, errors and cancellation stop every stage."""

from __future__ import annotations

import threading
import time

import pytest

from worker.media.pipeline import run_pipeline
from worker.sdk import Cancelled


def media_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("media-") and t.is_alive()]


def test_queues_bound_frames_in_flight():
    """A fast decoder never runs more than two queues and a batch ahead of the encoder."""
    produced, sunk, peak = [0], [0], [0]
    lock = threading.Lock()

    def source():
        for i in range(400):
            with lock:
                produced[0] += 1
                peak[0] = max(peak[0], produced[0] - sunk[0])
            yield "video", i

    def sink(kind, item):
        time.sleep(0.0005)  # a slow encoder
        with lock:
            sunk[0] += 1

    times = run_pipeline(source, lambda b: b, sink, batch_size=8, queue_size=16)
    assert sunk[0] == 400 and times.frames["encode"] == 400
    # two queues of 16, one batch of 8, one item in each thread's hands
    assert peak[0] <= 16 + 16 + 8 + 3
    assert not media_threads()


def test_order_and_side_items_pass_through():
    out = []

    def source():
        for i in range(50):
            yield "video", i
            if i % 10 == 0:
                yield "audio", f"a{i}"

    run_pipeline(source, lambda b: [x * 2 for x in b], lambda k, x: out.append((k, x)))
    assert [x for k, x in out if k == "video"] == [2 * i for i in range(50)]
    assert [x for k, x in out if k == "audio"] == [f"a{i}" for i in range(0, 50, 10)]


@pytest.mark.parametrize("stage", ["decode", "compute", "encode"])
def test_an_error_in_any_stage_stops_all_and_propagates(stage):
    def source():
        for i in range(10_000):
            if stage == "decode" and i == 30:
                raise ValueError("decode broke")
            yield "video", i

    def compute(batch):
        if stage == "compute" and batch[0] >= 40:
            raise ValueError("compute broke")
        return batch

    def sink(kind, item):
        if stage == "encode" and item == 20:
            raise ValueError("encode broke")

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"{stage} broke"):
        run_pipeline(source, compute, sink, batch_size=4, queue_size=4)
    assert time.monotonic() - t0 < 5
    assert not media_threads()


def test_cancel_between_batches_stops_promptly():
    batches = [0]

    def check():
        if batches[0] >= 3:
            raise Cancelled("job")

    def compute(batch):
        batches[0] += 1
        return batch

    def endless():
        i = 0
        while True:
            yield "video", i
            i += 1

    with pytest.raises(Cancelled):
        run_pipeline(endless, compute, lambda k, x: None, batch_size=4, check_cancelled=check)
    assert batches[0] == 3
    assert not media_threads()
