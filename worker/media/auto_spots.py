"""`auto` mode's candidates: the crops kept of each spot, and the statistics they share.

The detect pass (`worker/media/detect.py`) gives candidate spots and the
windows in which each is active; the analyse pass keeps, per spot, small
full-resolution crops (Y and U/V) from frames of its active windows and,
with a still camera, from frames where it is not active (`SpotData`,
`spot_data`). Everything after works on these crops: the blend test
(`worker/media/auto_blend.py`), the marks' templates
(`worker/media/auto_marks.py`). Whatever is set aside is recorded with its
reason (`Rejections`) for report.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media.detect import Detection, Spot

#: crops kept per candidate spot for the analysis (small: a mark-sized box each)
SPOT_SAMPLES = 96
#: ... and frames without it (still camera: the reference it is blended on)
OFF_SAMPLES = 32
#: extra pixels around a detected box in the analysis crops (at least; see `spot_data`)
PAD = 24
#: frames a test on one candidate (the blend test, a template search) runs on
TEST_FRAMES = 24


@dataclass
class SpotData:
    """One candidate spot: its crop in the frame, the crops kept of it, and the verdict."""

    spot: Spot
    #: crop origin and size (even) in the frame
    y0: int
    x0: int
    h: int
    w: int
    on_frames: set[int]
    off_frames: set[int]
    on_idx: list[int] = field(default_factory=list)
    on_y: list[np.ndarray] = field(default_factory=list)
    on_uv: list[np.ndarray] = field(default_factory=list)
    off_y: list[np.ndarray] = field(default_factory=list)
    off_uv: list[np.ndarray] = field(default_factory=list)
    #: the estimated shape (crop-sized, in [0, 1]) and what the model said
    shape: torch.Tensor | None = None
    opacity: float = 0.0
    colour: tuple[float, float, float] | None = None
    score: float = 0.0

    def keep(self, keep: torch.Tensor, *, on: bool = True) -> None:
        """Keep only the on (or off) crops where `keep` (K,) is true."""
        idx = [i for i, k in enumerate(keep.tolist()) if k]
        if on:
            self.on_y, self.on_uv = [self.on_y[i] for i in idx], [self.on_uv[i] for i in idx]
            self.on_idx = [self.on_idx[i] for i in idx]
        else:
            self.off_y, self.off_uv = [self.off_y[i] for i in idx], [self.off_uv[i] for i in idx]


def spot_data(s: Spot, det: Detection, frame_h: int, frame_w: int) -> SpotData:
    """The crop around spot `s` and the frames to keep of it (no pixels yet)."""
    fh, fw = frame_h, frame_w
    # A box may have cut the mark (part of it over a busy background): the
    # crop reaches half the box's size beyond it, so the whole mark found
    # elsewhere can still be looked for here.
    py, px = max(PAD, s.h // 2), max(PAD, s.w // 2)
    y0, x0 = even_floor(max(s.y - py, 0)), even_floor(max(s.x - px, 0))
    h = even_floor(min(s.y + s.h + py, fh) - y0)
    w = even_floor(min(s.x + s.w + px, fw) - x0)
    seen = s.windows if det.moving else s.strong
    on = [i for wi in sorted(seen) for i in window_frames(det, wi)]
    off: list[int] = []
    if not det.moving and not s.persistent:
        others = [wi for wi in range(len(det.starts)) if wi not in s.strong]
        off = [i for wi in others for i in window_frames(det, wi)]
    on = on[:: max(1, math.ceil(len(on) / SPOT_SAMPLES))]
    off = off[:: max(1, math.ceil(len(off) / OFF_SAMPLES))]
    return SpotData(s, y0, x0, h, w, set(on), set(off))


class Rejections:
    """The candidates set aside and why, for report.json, in the order they were.

    One entry per candidate (its latest reason: a candidate rejected again
    moves to the end; one claimed by a mark after all is dropped), after the
    detect pass's own entries.
    """

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self._entries: list[tuple[int | None, dict[str, Any]]] = [(None, e) for e in entries or []]

    def add(self, d: SpotData, reason: str, **extra: Any) -> bool:
        """Record why `d` is not a mark (replacing what it had); returns False, the verdict."""
        self._put(
            id(d), {**d.spot.box(), "windows": len(d.spot.windows), "reason": reason, **extra}
        )
        return False

    def drop(self, d: SpotData) -> None:
        """`d` is part of a mark after all: forget its rejection."""
        self._entries = [(k, e) for k, e in self._entries if k != id(d)]

    def extend(self, other: Rejections) -> None:
        """Record `other`'s entries after these, in their order (as if added here)."""
        for key, entry in other._entries:
            self._put(key, entry)

    def _put(self, key: int | None, entry: dict[str, Any]) -> None:
        self._entries = [(k, e) for k, e in self._entries if k is None or k != key]
        self._entries.append((key, entry))

    def entries(self) -> list[dict[str, Any]]:
        """The entries for report.json."""
        return [e for _, e in self._entries]


def highpass(y: torch.Tensor) -> torch.Tensor:
    """(K, h, w) minus its 7x7 local mean: the mark's strokes without the scene's shading."""
    if y.device.type != "cpu":
        return y - F.avg_pool2d(y[:, None], 7, 1, 3, count_include_pad=False)[:, 0]
    # The same local mean by OpenCV's box filter (sums over the window's part
    # inside the crop, divided by its size): ~10x faster than avg_pool2d on the CPU.
    h, w = y.shape[1:]
    count = cv2.boxFilter(
        np.ones((h, w), np.float32), -1, (7, 7), normalize=False, borderType=cv2.BORDER_CONSTANT
    )
    arr = y.contiguous().numpy()
    mean = np.stack(
        [
            cv2.boxFilter(a, -1, (7, 7), normalize=False, borderType=cv2.BORDER_CONSTANT) / count
            for a in arr
        ]
    )
    return y - torch.from_numpy(mean)


def shows_mark(y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Per crop (K, h, w), whether it shows `shape`: high-passed NCC against the typical one."""
    hp = highpass(y.float())
    pat = highpass(shape[None].float())[0]
    pat = pat - pat.mean()
    c = hp - hp.mean((1, 2), keepdim=True)
    ncc = (c * pat).sum((1, 2)) / (c.flatten(1).norm(dim=1) * pat.norm()).clamp_min(1e-6)
    # Frames with and without it form two clusters (about 0 and well above):
    # the threshold sits between the typical high score and zero, or the
    # typical low one when that is clearly above zero (a still scene under
    # the mark correlates with it by chance the same way in every frame).
    hi = float(torch.quantile(ncc, 0.9))
    lo = float(torch.quantile(ncc, 0.1))
    if -lo > hi:  # a dark mark correlates negatively with a bright template
        ncc, hi, lo = -ncc, -lo, -hi
    floor = lo + 0.4 * (hi - lo) if hi - lo > 0.1 else 0.0
    return ncc >= max(0.08, 0.4 * hi, floor)


def yuv(ys: list[np.ndarray], uvs: list[np.ndarray]) -> torch.Tensor:
    """(K, 3, h, w) float: the crops' Y and U/V (upsampled) stacked."""
    both = np.concatenate([np.stack(ys)[:, None], upsample_uv(np.stack(uvs))], 1)
    return torch.from_numpy(both).float()


def upsample_uv(uv: np.ndarray) -> np.ndarray:
    """(K, 2, h/2, w/2) -> (K, 2, h, w) by repetition."""
    return uv.repeat(2, axis=2).repeat(2, axis=3)


def window_frames(det: Detection, wi: int) -> range:
    """The frames of detection window `wi`."""
    s = det.starts[wi]
    return range(s, s + det.length)


def even_floor(v: int) -> int:
    """`v` rounded down to even (yuv420p crops start and end on even pixels)."""
    return v - (v % 2)
