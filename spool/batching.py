"""Packing stream messages into `Batch` messages (both sides of WorkerService.Connect).

A burst of small messages (the Assigns of one claim, the outcomes of many
finished jobs) costs one stream write instead of one per message; a batch stays
far below the gRPC message limit so a few large results never make it too big.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

#: most messages in one Batch
MAX_BATCH_MESSAGES = 500
#: most bytes in one Batch (the stream's message limit is 16 MiB by default)
MAX_BATCH_BYTES = 4 * 1024 * 1024


def chunks(
    msgs: Iterable[Any],
    *,
    max_messages: int = MAX_BATCH_MESSAGES,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[Any]]:
    """Consecutive runs of `msgs`, in order, each within both limits.

    A message larger than `max_bytes` on its own forms a run of one.
    """
    run: list[Any] = []
    size = 0
    for msg in msgs:
        n = msg.ByteSize()
        if run and (len(run) >= max_messages or size + n > max_bytes):
            yield run
            run, size = [], 0
        run.append(msg)
        size += n
    if run:
        yield run
