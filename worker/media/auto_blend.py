"""`auto` mode's blend test: is a candidate a blended mark, or scene content?

Each candidate must be *explained by the blend model* `J = (1-a) I + a W`
with one colour and one matte, not merely be static (`BlendTest.explain`):

- still camera: the difference between its on and off frames,
  `d = a (W - I_off)`, must be fitted by one colour `W` for every pixel
  (three planes, one unknown `a` per pixel) and a matte with `a < 0.9`;
  a mark comes and goes all at once (an occlusion sweeps across);
- moving scene, panning camera: inverting the mark with the fitted matte
  must make the region move with the scene (`_camera_motion`);
- moving content, no global motion: under the shape the temporal spread
  must shrink as `(1 - a)` against the background's (`fit_opacity`), with
  `0.08 <= a <= 0.9`: static opaque content (a UI badge, a logo burned in
  at full opacity) is not a blend.

A candidate that passes keeps its shape, opacity (and, still, colour) on
its `SpotData`; one that fails is recorded in `Rejections` with the reason.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media.auto_matte import MAX_OPACITY, MIN_OPACITY, blend_fit, refine_moving
from worker.media.auto_spots import TEST_FRAMES, Rejections, SpotData, shows_mark, upsample_uv, yuv
from worker.media.detect import Detection, median0
from worker.media.matte import border_mask, fit_opacity, shape_from_frames
from worker.media.restore import RestoreOptions, invert_blend

#: the blend model must explain this share of the on/off difference (still camera)
MIN_EXPLAINED = 0.75
#: with a panning camera, inverting a mark must cut the motion-compensated
#: frame difference on it by at least this share
MIN_MOTION_GAIN = 0.0
#: ... and each part of its shape kept as the mark must cut it by this share
MIN_PART_GAIN = 0.15
#: still camera: of the frames that do not show a candidate whole, at most this
#: share may show it in part (an object crossing in front of the scene does)
MAX_PARTIAL = 0.25


class BlendTest:
    """The blend test of the candidates of one video (its detection, the job's options)."""

    def __init__(self, det: Detection, options: RestoreOptions, rejections: Rejections) -> None:
        self.det, self.options, self.rejections = det, options, rejections

    def explain(self, d: SpotData) -> bool:
        """Whether the candidate is a blended mark; fills d.shape, opacity (and colour)."""
        if len(d.on_y) < 3:
            return self.rejections.add(d, "seen in too few frames to analyse")
        if self.det.moving:
            return self._moving(d)
        return self._still(d)

    def _still(self, d: SpotData) -> bool:
        if not d.off_y:
            return self.rejections.add(
                d, "still camera and never absent: cannot be told from the scene"
            )
        if not self._fit_still(d):
            return False
        # Drop on-frames that do not show it and off-frames that do, then fit again.
        assert d.shape is not None
        # One threshold for on and off frames together: under a still camera the
        # off frames are all alike, and a threshold drawn from them alone splits
        # their one cluster (every off frame then "shows" the mark).
        every = yuv(d.on_y + d.off_y, d.on_uv + d.off_uv)
        shows = shows_mark(torch.from_numpy(np.stack(d.on_y + d.off_y)), d.shape)
        keep_on, shows_off = shows[: len(d.on_y)], shows[len(d.on_y) :]
        if int(keep_on.sum()) < 3:
            return self.rejections.add(d, "seen in too few frames to analyse")
        d.keep(keep_on)
        if bool(shows_off.all()):
            return self.rejections.add(
                d, "still camera and never absent: cannot be told from the scene"
            )
        d.keep(~shows_off, on=False)
        if not self._fit_still(d):
            return False
        # A mark comes and goes all at once; something passing in front of the
        # scene (the other way to be "absent" for a while) sweeps across it.
        partial = _partial_share(
            every,
            median0(yuv(d.on_y, d.on_uv)),
            median0(yuv(d.off_y, d.off_uv)),
        )
        if partial > MAX_PARTIAL:
            return self.rejections.add(
                d,
                "it changes part by part over time (an occlusion), not all at once",
                partial=round(partial, 3),
            )
        return True

    def _fit_still(self, d: SpotData) -> bool:
        on = np.concatenate([np.stack(d.on_y)[:, None], upsample_uv(np.stack(d.on_uv))], 1)
        off = np.concatenate([np.stack(d.off_y)[:, None], upsample_uv(np.stack(d.off_uv))], 1)
        j = median0(torch.from_numpy(on).float())  # (3, h, w)
        i_off = median0(torch.from_numpy(off).float())
        diff = j - i_off
        mag = diff.norm(dim=0)
        strong = mag >= torch.quantile(mag, 0.97)
        if float(mag[strong].mean()) < 6:
            return self.rejections.add(d, "no consistent change between frames with and without it")
        a, w = blend_fit([(j, i_off)])
        wi = w.view(3, 1, 1) - i_off
        resid = diff - a[None] * wi
        on_mark = a > 0.05
        explained = 1 - float(
            (resid[:, on_mark] ** 2).sum() / (diff[:, on_mark] ** 2).sum().clamp_min(1e-6)
        )
        ring = border_mask(d.h, d.w, 3, a.device)
        noise = float(a[ring].std()) if bool(ring.any()) else 0.0
        # The opacity where the matte is well determined: where the mark's colour
        # is far from the background's (elsewhere `a = d / (W - I)` is noise).
        sure = on_mark & (wi.norm(dim=0) > 30)
        sure = sure if int(sure.sum()) >= 12 else on_mark
        opacity = float(torch.quantile(a[sure], 0.99)) if bool(sure.any()) else 0.0
        d.score = round(explained, 3)
        if explained < MIN_EXPLAINED:
            return self.rejections.add(
                d,
                "the change is not one colour blended with one matte",
                explained=round(explained, 3),
            )
        if opacity >= MAX_OPACITY:
            return self.rejections.add(
                d, "opaque: content, not a blended mark", opacity=round(opacity, 3)
            )
        if opacity < MIN_OPACITY:
            return self.rejections.add(d, "too faint to be a mark", opacity=round(opacity, 3))
        shape = (a / opacity).clamp(0, 1)
        shape = torch.where(a > max(3 * noise, 0.02), shape, torch.zeros_like(shape))
        if int((shape > 0.2).sum()) < 12:
            return self.rejections.add(d, "no shape left after the noise floor")
        # Around the mark nothing may change: else it is an occlusion or a scene change.
        around = (a < 0.02) & ~(F.max_pool2d(on_mark.float()[None, None], 5, 1, 2)[0, 0] > 0)
        if bool(around.any()):
            change = float(diff[:, around].norm(dim=0).median())
            if change > 6:
                return self.rejections.add(
                    d, "its surroundings change with it: not a blend", change=round(change, 2)
                )
        d.shape, d.opacity = shape, opacity
        d.colour = tuple(float(c) for c in w)  # type: ignore[assignment]
        return True

    def _moving(self, d: SpotData) -> bool:
        y = torch.from_numpy(np.stack(d.on_y)).float()[:, None]  # (K, 1, h, w)
        shape = shape_from_frames(median0(y)[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self.rejections.add(d, "no static shape under the moving scene")
        # Frames of its windows that do not show it (it jumped mid-window) would
        # inflate the spread under it: keep the ones that do, and look again.
        keep = shows_mark(y[:, 0], shape)
        if int(keep.sum()) < 3:
            return self.rejections.add(d, "seen in too few frames to analyse")
        d.keep(keep)
        y = y[keep]
        shape = shape_from_frames(median0(y)[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self.rejections.add(d, "no static shape under the moving scene")
        pairs = _consecutive(d.on_idx, self.det.shifts)
        if len(pairs) >= 3 and float(np.median([math.hypot(*s) for _, _, s in pairs])) > 0.5:
            return self._camera_motion(d, shape, pairs)
        return self._spread(d, y, shape)

    def _camera_motion(
        self, d: SpotData, shape: torch.Tensor, pairs: list[tuple[int, int, tuple[float, float]]]
    ) -> bool:
        """The blend test against the scene's own motion (a camera that pans).

        The scene moves by the global shift from frame to frame; a mark does
        not. Under a blend, inverting it with the fitted matte must leave
        pixels that move with the scene: the motion-compensated difference
        between consecutive frames, on and around the mark, must drop. Static
        scene content (opaque, or an edge that merely slid along itself)
        inverted as if it were a mark does the opposite.
        """
        # A test, not the final matte: a bounded number of frames is plenty.
        step = max(1, math.ceil(len(d.on_y) / TEST_FRAMES))
        fitted = refine_moving(d.on_y[::step], d.on_uv[::step], shape, self.options)
        if fitted is None:
            return self.rejections.add(d, "no static shape under the moving scene")
        alpha, colour = fitted
        y = torch.from_numpy(np.stack(d.on_y)).float()
        inv = invert_blend(y[:, None], alpha, colour[:1])[:, 0]
        pairs = pairs[:: max(1, math.ceil(len(pairs) / TEST_FRAMES))]
        before = _compensated_residual_map(y, pairs)
        after = _compensated_residual_map(inv, pairs)
        on_mark = alpha > 0.02

        def gain_on(part: torch.Tensor) -> float:
            support = F.max_pool2d((part & on_mark).float()[None, None], 5, 1, 2)[0, 0] > 0
            b, a = before[0][support].sum(), after[0][support].sum()
            return 1 - float(a) / max(float(b), 1e-6)

        # Each part of the shape on its own: the temporal median also keeps
        # scene structure that slid along itself (a long bright bar in a
        # horizontal pan) next to the mark, and inverting that part as if it
        # were a mark would outweigh the gain on the mark itself.
        near = F.max_pool2d((shape > 0.2).float()[None, None], 5, 1, 2)[0, 0] > 0
        n_parts, labels = cv2.connectedComponents(near.numpy().astype(np.uint8))
        keep = torch.zeros_like(near)
        for i in range(1, n_parts):
            part = torch.from_numpy(labels == i)
            if gain_on(part) >= MIN_PART_GAIN:
                keep |= part
        gain = gain_on(keep) if bool(keep.any()) else gain_on(near)
        d.score = round(gain, 3)
        if not bool(keep.any()) or gain < MIN_MOTION_GAIN:
            return self.rejections.add(
                d,
                "inverting it does not make the region move with the scene",
                motion_gain=round(gain, 3),
            )
        kept = on_mark & keep
        opacity = float(torch.quantile(alpha[kept], 0.99)) if bool(kept.any()) else 0.0
        if opacity >= MAX_OPACITY:
            return self.rejections.add(
                d, "opaque: content, not a blended mark", opacity=round(opacity, 3)
            )
        if opacity < MIN_OPACITY:
            return self.rejections.add(d, "too faint to be a mark", opacity=round(opacity, 3))
        # The template stays the temporal median's shape (its parts that behave
        # as a blend): the per-pixel fit on one spot's few frames is noisier;
        # the mark's matte is fitted again on the crops of all its spots
        # (`MarkBuilder._make_mark`, worker/media/auto_marks.py).
        d.shape = torch.where(keep, shape, torch.zeros_like(shape))
        d.opacity = opacity
        return True

    def _spread(self, d: SpotData, y: torch.Tensor, shape: torch.Tensor) -> bool:
        """The blend test without a global motion: the spread shrinks by (1 - a) under it."""
        opacity = fit_opacity(y, shape) if y.shape[0] >= 3 else 0.0
        # The spread must really shrink under the shape: compare the fitted model
        # against no mark at all on the pixels of the shape.
        std = y.std(0)[0]
        off = shape == 0
        bg = float(std[off].median()) if bool(off.any()) else 0.0
        if bg < 4:
            return self.rejections.add(
                d, "the scene does not move under it", background_std=round(bg, 2)
            )
        on_mark = shape > 0.5
        ratio = float(std[on_mark].median()) / bg if bool(on_mark.any()) else 1.0
        d.score = round(1 - ratio, 3)
        if opacity >= MAX_OPACITY or ratio < 1 - MAX_OPACITY:
            return self.rejections.add(
                d, "opaque: content, not a blended mark", opacity=round(opacity, 3)
            )
        if opacity < MIN_OPACITY or ratio > 1 - MIN_OPACITY / 2:
            return self.rejections.add(
                d,
                "the scene's spread does not shrink under it as a blend would",
                opacity=round(opacity, 3),
                spread_ratio=round(ratio, 3),
            )
        d.shape, d.opacity = shape, opacity
        return True


def _consecutive(
    idx: list[int], shifts: dict[int, tuple[float, float]]
) -> list[tuple[int, int, tuple[float, float]]]:
    """(k - 1, k, shift) for crops k whose frame directly follows crop k - 1's."""
    return [
        (k - 1, k, shifts[idx[k]])
        for k in range(1, len(idx))
        if idx[k] == idx[k - 1] + 1 and idx[k] in shifts
    ]


def _compensated_residual_map(
    y: torch.Tensor, pairs: list[tuple[int, int, tuple[float, float]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the sum over `pairs` of |y_k - y_{k-1} shifted by the scene's motion|
    away from the crop's edges, and how many pairs counted there."""
    h, w = y.shape[1:]
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for a, b, (dy, dx) in pairs:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        prev = cv2.warpAffine(y[a].numpy(), m, (w, h), flags=cv2.INTER_LINEAR)
        inner = torch.ones(h, w, dtype=torch.bool)
        my, mx = math.ceil(abs(dy)) + 1, math.ceil(abs(dx)) + 1
        inner[:my], inner[h - my :], inner[:, :mx], inner[:, w - mx :] = False, False, False, False
        total += torch.where(inner, (y[b] - torch.from_numpy(prev)).abs(), 0.0)
        count += inner.float()
    return total, count


def _partial_share(frames: torch.Tensor, on: torch.Tensor, off: torch.Tensor) -> float:
    """Of the frames (K, 3, h, w) not like `on` (3, h, w), the share not like `off` either.

    Over the pixels where on and off clearly differ, each frame's share of
    pixels closer to `on`: a blended mark that comes and goes gives about 0
    or 1 in every frame; an object crossing in front of the scene covers it
    part by part, so many of the frames that do not show it all show it in
    part.
    """
    diff = (on - off).norm(dim=0)
    clear = diff > 12
    if int(clear.sum()) < 12:
        return 0.0
    d_on = (frames - on[None]).norm(dim=1)[:, clear]
    d_off = (frames - off[None]).norm(dim=1)[:, clear]
    share = (d_on < d_off).float().mean(1)
    not_on = share < 0.8
    if not bool(not_on.any()):
        return 0.0
    return float((not_on & (share > 0.2)).sum() / not_on.sum())
