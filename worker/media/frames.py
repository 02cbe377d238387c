"""Overlay removal on decoded RGB frames in memory: the algorithm without any codec.

The video handler runs the same steps on yuv420p planes inside the streaming
pipeline; this form exists to measure the method itself (bench/quality.py and
tests/media) without chroma subsampling or compression in the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.media.locate import Locator
from worker.media.matte import Matte, estimate_matte
from worker.media.overlay import MARGIN
from worker.media.restore import (
    NoiseModel,
    RestoreOptions,
    calibrate_noise,
    choose_fill,
    plan_crops,
    restore_crops,
)


@dataclass
class FramesResult:
    """Restored frames plus what was found."""

    frames: list[np.ndarray]
    positions: list[tuple[int, int] | None]
    matte: Matte | None
    noise: NoiseModel | None = None


def _luma(rgb: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rgb)).float()
    return t[..., 0] * 0.299 + t[..., 1] * 0.587 + t[..., 2] * 0.114


def remove_from_frames(
    frames: Sequence[np.ndarray],
    options: RestoreOptions,
    *,
    template_alpha: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    samples: int = 48,
    min_score: float = 0.35,
) -> FramesResult:
    """Remove one mark from RGB frames (template: tracked; box: (x, y, w, h), static)."""
    fh, fw = frames[0].shape[:2]
    if template_alpha is not None:
        th, tw = template_alpha.shape
        locator = Locator(torch.from_numpy(template_alpha), min_score=min_score)
        found = [locator.locate(_luma(f)) for f in frames]
        positions = [(m.y, m.x) if m else None for m in found]
    elif box is not None:
        x, y, tw, th = box
        positions = [(y, x)] * len(frames)
    else:
        raise ValueError("give template_alpha or box")
    h, w = min(th + 2 * MARGIN, fh), min(tw + 2 * MARGIN, fw)

    def corner(p: tuple[int, int]) -> tuple[int, int]:
        return (min(max(p[0] - MARGIN, 0), fh - h), min(max(p[1] - MARGIN, 0), fw - w))

    # Aligned crops from frames spread over the clip, one offset group (see overlay.py).
    marked = [i for i, p in enumerate(positions) if p is not None]
    if not marked:
        return FramesResult([f.copy() for f in frames], positions, None)
    step = max(1, len(marked) // samples)
    offsets = {}
    for i in marked[::step][:samples]:
        p = positions[i]
        assert p is not None
        y0, x0 = corner(p)
        offsets.setdefault((p[0] - y0, p[1] - x0), []).append(frames[i][y0 : y0 + h, x0 : x0 + w])
    (oy, ox), crops = max(offsets.items(), key=lambda kv: len(kv[1]))
    stack = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    shape = None
    if template_alpha is not None:
        shape = torch.zeros(h, w)
        shape[oy : oy + th, ox : ox + tw] = torch.from_numpy(template_alpha)[: h - oy, : w - ox]
    matte = estimate_matte(stack, shape=shape, ring=MARGIN // 2)
    mark = matte.alpha[oy : oy + th, ox : ox + tw]
    noise = None
    if options.fills is None:
        options = options.with_cache()
    if options.method != "invert":
        options = choose_fill(stack.to(torch.uint8), matte.alpha, matte.colour, options)
    if options.method == "hybrid":
        noise = calibrate_noise(stack.to(torch.uint8), matte.alpha, matte.colour, options)
    plans: dict = {}
    out = [f.copy() for f in frames]
    for i in marked:
        p = positions[i]
        assert p is not None
        y0, x0 = corner(p)
        dy, dx = p[0] - y0, p[1] - x0
        alpha = torch.zeros(h, w)
        alpha[dy : dy + th, dx : dx + tw] = mark[: h - dy, : w - dx]
        crop = torch.from_numpy(np.ascontiguousarray(frames[i][y0 : y0 + h, x0 : x0 + w]))
        if (dy, dx) not in plans:
            plans[(dy, dx)] = plan_crops(alpha, options, noise)
        plan = plans[(dy, dx)]
        res = restore_crops(crop.permute(2, 0, 1)[None], alpha, matte.colour, options, plan=plan)
        out[i][y0 : y0 + h, x0 : x0 + w] = res[0].permute(1, 2, 0).numpy()
    return FramesResult(out, positions, matte, noise)
