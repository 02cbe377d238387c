"""The bounded streaming pipeline every video job runs on.

    decode thread ─► bounded queue ─► compute (calling thread, batched)
                  ─► bounded queue ─► encode thread

Decode, compute and encode overlap; at most `queue_size` decoded frames wait in
each queue and one batch is in compute, so memory is flat however long the
video is. The first error in any stage stops the others (every blocking queue
operation polls a shared stop flag) and is re-raised in the calling thread
after both threads have been joined: no stage is ever left hanging.
Cancellation is checked between batches by the compute stage.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: how often blocked queue operations look at the stop flag
POLL_S = 0.05
#: how long joining a stage may take after a stop before we give up on it
JOIN_TIMEOUT_S = 30.0

_END = object()


class PipelineStopped(Exception):
    """Internal: another stage failed; this one unwinds quietly."""


@dataclass
class StageTimes:
    """Frames handled and busy seconds per stage (fps = frames / seconds)."""

    frames: dict[str, int] = field(default_factory=lambda: {"decode": 0, "compute": 0, "encode": 0})
    busy_s: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "compute": 0.0, "encode": 0.0}
    )
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Per-stage fps (of busy time) plus end-to-end fps, for reports."""
        out: dict[str, Any] = {"wall_s": round(self.wall_s, 3)}
        for stage, n in self.frames.items():
            busy = self.busy_s[stage]
            out[f"{stage}_fps"] = round(n / busy, 1) if busy > 0 and n else None
        done = self.frames["compute"]
        out["end_to_end_fps"] = round(done / self.wall_s, 1) if self.wall_s > 0 else None
        return out


class _Stages:
    """Shared state: the stop flag and the first error."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise PipelineStopped
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    raise PipelineStopped from None


def run_pipeline(
    source: Callable[[], Iterator[tuple[str, Any]]],
    compute: Callable[[list[Any]], Iterable[Any]],
    sink: Callable[[str, Any], None] | None = None,
    *,
    batch_size: int = 8,
    queue_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    finish: Callable[[], Iterable[Any]] | None = None,
) -> StageTimes:
    """Stream `source()` items through `compute` (in batches of video frames) into `sink`.

    `source()` is called in the decode thread and yields `(kind, item)` pairs;
    kind "video" items are batched for `compute`, which returns the items to
    pass on (same order); anything else (audio packets) goes straight to
    `sink` (the encode thread). `on_batch(frames_done)` and
    `check_cancelled()` run in the calling thread between batches; an exception
    from either (e.g. `Cancelled`) stops the pipeline and propagates.

    `compute` may hold frames back (return fewer than it got) and release them
    with a later batch; `finish()`, called after the last batch, returns the
    ones still held. Frames reach the sink in the order `compute` returns them.
    Either may return a lazy iterable: each item goes to the encoder as soon
    as it is produced, so a long release does not leave the encoder idle.
    """
    st = _Stages()
    times = StageTimes()
    q_in: queue.Queue = queue.Queue(maxsize=queue_size)
    q_out: queue.Queue | None = queue.Queue(maxsize=queue_size) if sink is not None else None

    def decode() -> None:
        it = None
        try:
            it = source()
            t = time.perf_counter()
            for kind, item in it:
                if kind == "video":
                    times.frames["decode"] += 1
                times.busy_s["decode"] += time.perf_counter() - t
                st.put(q_in, (kind, item))
                t = time.perf_counter()
            st.put(q_in, _END)
        except PipelineStopped:
            pass
        except BaseException as exc:
            st.fail(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def encode() -> None:
        assert q_out is not None and sink is not None
        try:
            while True:
                item = st.get(q_out)
                if item is _END:
                    return
                kind, payload = item
                t = time.perf_counter()
                sink(kind, payload)
                times.busy_s["encode"] += time.perf_counter() - t
                if kind == "video":
                    times.frames["encode"] += 1
        except PipelineStopped:
            pass
        except BaseException as exc:
            st.fail(exc)

    threads = [threading.Thread(target=decode, name="media-decode", daemon=True)]
    if sink is not None:
        threads.append(threading.Thread(target=encode, name="media-encode", daemon=True))
    start = time.perf_counter()
    for th in threads:
        th.start()

    def flush(batch: list[Any], *, last: bool = False) -> None:
        if check_cancelled is not None:
            check_cancelled()
        t = time.perf_counter()
        out: Iterable[Any] = compute(batch) if batch else []
        if last and finish is not None:
            out = itertools.chain(out, finish())
        items = iter(out)
        times.busy_s["compute"] += time.perf_counter() - t
        times.frames["compute"] += len(batch)
        while True:
            # A lazy `out` computes as it goes: time only that, not the puts.
            t = time.perf_counter()
            item = next(items, _END)
            times.busy_s["compute"] += time.perf_counter() - t
            if item is _END:
                break
            if q_out is not None:
                st.put(q_out, ("video", item))
        if on_batch is not None:
            on_batch(times.frames["compute"])

    try:
        batch: list[Any] = []
        while True:
            item = st.get(q_in)
            if item is _END:
                break
            kind, payload = item
            if kind == "video":
                batch.append(payload)
                if len(batch) >= batch_size:
                    flush(batch)
                    batch = []
            elif q_out is not None:
                st.put(q_out, item)
        if batch or finish is not None:
            flush(batch, last=True)
        if q_out is not None:
            st.put(q_out, _END)
    except PipelineStopped:
        pass
    except BaseException as exc:
        st.fail(exc)
    finally:
        if st.error is not None:
            st.stop.set()
        for th in threads:
            th.join(JOIN_TIMEOUT_S)
        times.wall_s = time.perf_counter() - start
    if st.error is not None:
        raise st.error
    return times
