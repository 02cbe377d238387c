"""Moving uint8 pixels to the compute device the cheap way.

Pixels travel as uint8 (4x less than float) and are converted on the device.
On CUDA the host side is a reused pinned buffer and copies are `non_blocking`,
so the copy overlaps with the previous batch's kernels; on the CPU the numpy
array is wrapped without a copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if usable, else CUDA when available, else the CPU."""
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """Limit torch's intra-op threads while a video job computes on the CPU.

    The crops are small: splitting them across threads costs more than it
    gains, and OpenMP workers spinning on the same cores starve the decode and
    encode threads (measured: a batch of 8 inversions 0.6 ms with one thread,
    7 ms with two on a loaded 2-core machine). Restored afterwards.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Stager:
    """Host → device transfers of uint8 arrays through one reused (pinned) buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A uint8 tensor on the device holding `array` (which is not modified)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return host
        n = host.numel()
        if self._copied is not None:
            # The previous batch's copy must be done before its buffer is reused.
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
        buf = self._pinned[:n].view(host.shape)
        buf.copy_(host)
        out = buf.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out

    @staticmethod
    def to_host(tensor: torch.Tensor) -> np.ndarray:
        """Back to a numpy uint8 array."""
        return tensor.to("cpu").numpy()
