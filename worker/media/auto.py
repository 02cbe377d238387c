"""`auto` mode: find marks that stay, jump, come and go, with nothing but the video.

Three streaming passes on `run_pipeline`, memory bounded whatever the length:

1. *detect* (`worker/media/detect.py`): per-window structure maps at low
   resolution give candidate spots and the windows in which each is active.
2. *analyse*: for every candidate spot, small crops (full resolution, Y and
   U/V) from frames of its active windows, and, with a still camera, from
   frames where it is not active. Each candidate must then be *explained by
   the blend model* `J = (1-a) I + a W` with one colour and one matte:
   - still camera: the difference between its on and off frames,
     `d = a (W - I_off)`, must be fitted by one colour `W` for every pixel
     (three planes, one unknown `a` per pixel) and a matte with `a < 0.9`;
   - moving scene: its temporal median must hold a shape, and under that
     shape the temporal spread must shrink as `(1 - a)` against the
     background's (`fit_opacity`), with `0.08 <= a <= 0.9`: static opaque
     content (a UI badge, a logo burned in at full opacity) is not a blend.
   Candidates whose shapes match (a jumping mark's spots) become one mark;
   over a moving scene its template is pooled over all its spots and grown
   to the whole mark where a box had cut it (`_grow_shape`: parts that
   stand out of every spot's median, near what is kept), then looked for
   again; its matte is estimated from the aligned crops of all its spots.
3. *restore*: at each of its spots, per frame, a mark is taken as present
   when inverting the blend there removes edge energy instead of adding it
   (`present_ratio`, with hysteresis); only then is the crop restored.
   Frames without the mark are left as they are.

`AutoPlanner.report()` gives what was found as runs (frames, box, score) and
every rejected candidate with its reason, for report.json.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media import io as vio
from worker.media.detect import (
    Detection,
    DetectPass,
    Spot,
    find_spots,
    gradients,
    median0,
    overlap,
)
from worker.media.locate import ncc_map
from worker.media.matte import border_mask, downsample_alpha, fit_opacity, shape_from_frames
from worker.media.restore import RestoreOptions, fill_crops, inpaint_threads, invert_blend

if TYPE_CHECKING:
    from worker.media.overlay import OverlayRemover, Placement, Region

#: crops kept per candidate spot for the analysis (small: a mark-sized box each)
SPOT_SAMPLES = 96
#: ... and frames without it (still camera: the reference it is blended on)
OFF_SAMPLES = 32
#: extra pixels around a detected box in the analysis crops (at least; see `_spot_data`)
PAD = 24
#: frames the blend test of one candidate fits on, and the joint matte of a mark
TEST_FRAMES = 24
MATTE_FRAMES = 64
#: a blended mark lets some of the scene through: above this it is opaque content
MAX_OPACITY = 0.9
MIN_OPACITY = 0.08
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
#: a template needs this many clear pixels (shape > 0.2) to be looked for elsewhere:
#: a fragment of a few strokes matches texture anywhere
MIN_MARK_PIXELS = 64
#: a found mark's template that correlates this well with a part of a larger
#: one's is that mark, seeded from a box that cut it (`_merge_parts`)
PART_NCC = 0.4
#: the template is looked for again this many pixels around it (`_pool_shape`)
GROW = 10
#: ... over a window this many times its height past it
REACH = 1.5
#: ... its parts joined when this share of its height apart (`_pool_shape`)
LINK_SHARE = 0.5
#: ... at most this many times (each from what the last one kept)
GROW_ROUNDS = 3
#: ... of parts at least this large (pixels, and share of the template's)
MIN_PART_PIXELS = 8
PART_SHARE = 0.01
#: ... and the grown template may hold at most this many times the pixels it had
MAX_GROWTH = 2.0
#: two candidates are one mark when their shapes correlate this well
SAME_MARK_NCC = 0.6
#: moving scene: a template below SAME_MARK_NCC still matches a spot when this many
#: sampled frames score at least AGREE_NCC at the same pixel (within 1 px)
AGREE_NCC = 0.35
AGREE_FRAMES = 4
#: per frame: the mark is present when inverting leaves at most this share of the
#: edge energy under it (entering) / keeps it present below the second (staying)
ENTER_RATIO = 0.92
STAY_RATIO = 1.0
#: still camera: the opacity and colour are fitted again on the mark's solid core
#: when it has this many pixels and its background this spread (grey levels)
CORE_PIXELS = 24
CORE_SPREAD = 6.0
#: ... and the matte read from luma alone where it differs from the background's by this
LUMA_CONTRAST = 25.0
#: threads for OpenCV's fills during the analysis between the passes
PLAN_THREADS = max(1, min(os.cpu_count() or 1, 4))
#: report.json's mark mask: the pixels where the mark's shape exceeds this
MASK_LEVEL = 0.1


def _even_floor(v: int) -> int:
    return v - (v % 2)


def _upsample_uv(uv: np.ndarray) -> np.ndarray:
    """(K, 2, h/2, w/2) -> (K, 2, h, w) by repetition."""
    return uv.repeat(2, axis=2).repeat(2, axis=3)


@dataclass
class _SpotData:
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


@dataclass
class AutoMark:
    """An accepted mark: its region index and the top-left (y, x) of each of its spots."""

    region: int
    spots: list[tuple[int, int]]
    still: bool
    #: per spot: present in the previous frame (hysteresis) and its runs so far
    state: list[bool] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: the template's (height, width)
    size: tuple[int, int] = (0, 0)


class AutoPlanner:
    """Runs detect and analyse for an `OverlayRemover`, then decides placements per frame."""

    def __init__(self, remover: OverlayRemover) -> None:
        self.r = remover
        self.det: Detection | None = None
        self.marks: list[AutoMark] = []
        self.rejected: list[dict[str, Any]] = []
        self.candidates = 0
        self.min_ratio: dict[int, float] = {}
        #: per (region, offset): what the presence test reads of each plane
        self._probes: dict[tuple[int, tuple[int, int]], list[_Probe]] = {}

    @property
    def det_moving(self) -> bool:
        return self.det is not None and self.det.moving

    # -- passes -----------------------------------------------------------------
    def plan(self) -> None:
        """Detect candidates, analyse them, keep the ones the blend model explains."""
        r = self.r
        info = r.info
        dp = DetectPass(info.width, info.height, r.total, device=r.device)
        count = [0]

        def detect(frames: list) -> list:
            for frame in frames:
                dp.add(count[0], vio.plane_views(frame)[0])
                count[0] += 1
            return frames

        r._run("detect", detect)
        self.det = det = dp.finish()
        spots, self.rejected = find_spots(det)
        self.candidates = len(spots)
        if not spots:
            return
        data = [self._spot_data(s, det) for s in spots]
        wanted: dict[int, list[tuple[_SpotData, bool]]] = {}
        for d in data:
            for frames, on in ((d.on_frames, True), (d.off_frames, False)):
                for i in frames:
                    wanted.setdefault(i, []).append((d, on))
        count[0] = 0

        def analyse(frames: list) -> list:
            for frame in frames:
                for d, on in wanted.get(count[0], ()):
                    views = vio.plane_views(frame)
                    y = views[0][d.y0 : d.y0 + d.h, d.x0 : d.x0 + d.w].copy()
                    uv = np.stack(
                        [
                            v[d.y0 // 2 : (d.y0 + d.h) // 2, d.x0 // 2 : (d.x0 + d.w) // 2]
                            for v in views[1:]
                        ]
                    )
                    if on:
                        d.on_idx.append(count[0])
                    (d.on_y if on else d.off_y).append(y)
                    (d.on_uv if on else d.off_uv).append(uv)
                count[0] += 1
            return frames

        r._run("analyse", analyse)
        # Nothing decodes or encodes between the passes: the cores are free for
        # OpenCV's fills (torch's own threads did not pay on these small crops).
        with inpaint_threads(PLAN_THREADS):
            accepted = [d for d in data if self._explain(d, det.moving)]
            self._build_marks(data, accepted, still=not det.moving)

    def _spot_data(self, s: Spot, det: Detection) -> _SpotData:
        fh, fw = self.r.info.height, self.r.info.width
        # A box may have cut the mark (part of it over a busy background): the
        # crop reaches half the box's size beyond it, so the whole mark found
        # elsewhere can still be looked for here.
        py, px = max(PAD, s.h // 2), max(PAD, s.w // 2)
        y0, x0 = _even_floor(max(s.y - py, 0)), _even_floor(max(s.x - px, 0))
        h = _even_floor(min(s.y + s.h + py, fh) - y0)
        w = _even_floor(min(s.x + s.w + px, fw) - x0)
        seen = s.windows if det.moving else s.strong
        on = [i for wi in sorted(seen) for i in _window_frames(det, wi)]
        off: list[int] = []
        if not det.moving and not s.persistent:
            others = [wi for wi in range(len(det.starts)) if wi not in s.strong]
            off = [i for wi in others for i in _window_frames(det, wi)]
        on = on[:: max(1, math.ceil(len(on) / SPOT_SAMPLES))]
        off = off[:: max(1, math.ceil(len(off) / OFF_SAMPLES))]
        return _SpotData(s, y0, x0, h, w, set(on), set(off))

    # -- the blend model ----------------------------------------------------------
    def _reject(self, d: _SpotData, reason: str, **extra: Any) -> bool:
        self.rejected = [r for r in self.rejected if r.get("_id") != id(d)]
        self.rejected.append(
            {
                **d.spot.box(),
                "windows": len(d.spot.windows),
                "reason": reason,
                **extra,
                "_id": id(d),
            }
        )
        return False

    def _explain(self, d: _SpotData, moving: bool) -> bool:
        """Whether the candidate is a blended mark; fills d.shape, opacity (and colour)."""
        if len(d.on_y) < 3:
            return self._reject(d, "seen in too few frames to analyse")
        if moving:
            return self._explain_moving(d)
        return self._explain_still(d)

    def _keep(self, d: _SpotData, keep: torch.Tensor, *, on: bool = True) -> None:
        idx = [i for i, k in enumerate(keep.tolist()) if k]
        if on:
            d.on_y, d.on_uv = [d.on_y[i] for i in idx], [d.on_uv[i] for i in idx]
            d.on_idx = [d.on_idx[i] for i in idx]
        else:
            d.off_y, d.off_uv = [d.off_y[i] for i in idx], [d.off_uv[i] for i in idx]

    def _explain_still(self, d: _SpotData) -> bool:
        if not d.off_y:
            return self._reject(d, "still camera and never absent: cannot be told from the scene")
        if not self._fit_still(d):
            return False
        # Drop on-frames that do not show it and off-frames that do, then fit again.
        assert d.shape is not None
        # One threshold for on and off frames together: under a still camera the
        # off frames are all alike, and a threshold drawn from them alone splits
        # their one cluster (every off frame then "shows" the mark).
        every = _yuv(d.on_y + d.off_y, d.on_uv + d.off_uv)
        shows = _shows(torch.from_numpy(np.stack(d.on_y + d.off_y)), d.shape)
        keep_on, shows_off = shows[: len(d.on_y)], shows[len(d.on_y) :]
        if int(keep_on.sum()) < 3:
            return self._reject(d, "seen in too few frames to analyse")
        self._keep(d, keep_on)
        if bool(shows_off.all()):
            return self._reject(d, "still camera and never absent: cannot be told from the scene")
        self._keep(d, ~shows_off, on=False)
        if not self._fit_still(d):
            return False
        # A mark comes and goes all at once; something passing in front of the
        # scene (the other way to be "absent" for a while) sweeps across it.
        partial = _partial_share(
            every,
            median0(_yuv(d.on_y, d.on_uv)),
            median0(_yuv(d.off_y, d.off_uv)),
        )
        if partial > MAX_PARTIAL:
            return self._reject(
                d,
                "it changes part by part over time (an occlusion), not all at once",
                partial=round(partial, 3),
            )
        return True

    def _fit_still(self, d: _SpotData) -> bool:
        on = np.concatenate([np.stack(d.on_y)[:, None], _upsample_uv(np.stack(d.on_uv))], 1)
        off = np.concatenate([np.stack(d.off_y)[:, None], _upsample_uv(np.stack(d.off_uv))], 1)
        j = median0(torch.from_numpy(on).float())  # (3, h, w)
        i_off = median0(torch.from_numpy(off).float())
        diff = j - i_off
        mag = diff.norm(dim=0)
        strong = mag >= torch.quantile(mag, 0.97)
        if float(mag[strong].mean()) < 6:
            return self._reject(d, "no consistent change between frames with and without it")
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
            return self._reject(
                d,
                "the change is not one colour blended with one matte",
                explained=round(explained, 3),
            )
        if opacity >= MAX_OPACITY:
            return self._reject(d, "opaque: content, not a blended mark", opacity=round(opacity, 3))
        if opacity < MIN_OPACITY:
            return self._reject(d, "too faint to be a mark", opacity=round(opacity, 3))
        shape = (a / opacity).clamp(0, 1)
        shape = torch.where(a > max(3 * noise, 0.02), shape, torch.zeros_like(shape))
        if int((shape > 0.2).sum()) < 12:
            return self._reject(d, "no shape left after the noise floor")
        # Around the mark nothing may change: else it is an occlusion or a scene change.
        around = (a < 0.02) & ~(F.max_pool2d(on_mark.float()[None, None], 5, 1, 2)[0, 0] > 0)
        if bool(around.any()):
            change = float(diff[:, around].norm(dim=0).median())
            if change > 6:
                return self._reject(
                    d, "its surroundings change with it: not a blend", change=round(change, 2)
                )
        d.shape, d.opacity = shape, opacity
        d.colour = tuple(float(c) for c in w)  # type: ignore[assignment]
        return True

    def _explain_moving(self, d: _SpotData) -> bool:
        y = torch.from_numpy(np.stack(d.on_y)).float()[:, None]  # (K, 1, h, w)
        shape = shape_from_frames(median0(y)[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self._reject(d, "no static shape under the moving scene")
        # Frames of its windows that do not show it (it jumped mid-window) would
        # inflate the spread under it: keep the ones that do, and look again.
        keep = _shows(y[:, 0], shape)
        if int(keep.sum()) < 3:
            return self._reject(d, "seen in too few frames to analyse")
        self._keep(d, keep)
        y = y[keep]
        shape = shape_from_frames(median0(y)[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self._reject(d, "no static shape under the moving scene")
        assert self.det is not None
        pairs = _consecutive(d.on_idx, self.det.shifts)
        if len(pairs) >= 3 and float(np.median([math.hypot(*s) for _, _, s in pairs])) > 0.5:
            return self._explain_camera_motion(d, shape, pairs)
        return self._explain_spread(d, y, shape)

    def _explain_camera_motion(
        self, d: _SpotData, shape: torch.Tensor, pairs: list[tuple[int, int, tuple[float, float]]]
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
        fitted = _refine_moving(d.on_y[::step], d.on_uv[::step], shape, self.r.options)
        if fitted is None:
            return self._reject(d, "no static shape under the moving scene")
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
            return self._reject(
                d,
                "inverting it does not make the region move with the scene",
                motion_gain=round(gain, 3),
            )
        kept = on_mark & keep
        opacity = float(torch.quantile(alpha[kept], 0.99)) if bool(kept.any()) else 0.0
        if opacity >= MAX_OPACITY:
            return self._reject(d, "opaque: content, not a blended mark", opacity=round(opacity, 3))
        if opacity < MIN_OPACITY:
            return self._reject(d, "too faint to be a mark", opacity=round(opacity, 3))
        # The template stays the temporal median's shape (its parts that behave
        # as a blend): the per-pixel fit on one spot's few frames is noisier;
        # the mark's matte is fitted again on the crops of all its spots
        # (`_make_mark`).
        d.shape = torch.where(keep, shape, torch.zeros_like(shape))
        d.opacity = opacity
        return True

    def _explain_spread(self, d: _SpotData, y: torch.Tensor, shape: torch.Tensor) -> bool:
        """The blend test without a global motion: the spread shrinks by (1 - a) under it."""
        opacity = fit_opacity(y, shape) if y.shape[0] >= 3 else 0.0
        # The spread must really shrink under the shape: compare the fitted model
        # against no mark at all on the pixels of the shape.
        std = y.std(0)[0]
        off = shape == 0
        bg = float(std[off].median()) if bool(off.any()) else 0.0
        if bg < 4:
            return self._reject(d, "the scene does not move under it", background_std=round(bg, 2))
        on_mark = shape > 0.5
        ratio = float(std[on_mark].median()) / bg if bool(on_mark.any()) else 1.0
        d.score = round(1 - ratio, 3)
        if opacity >= MAX_OPACITY or ratio < 1 - MAX_OPACITY:
            return self._reject(d, "opaque: content, not a blended mark", opacity=round(opacity, 3))
        if opacity < MIN_OPACITY or ratio > 1 - MIN_OPACITY / 2:
            return self._reject(
                d,
                "the scene's spread does not shrink under it as a blend would",
                opacity=round(opacity, 3),
                spread_ratio=round(ratio, 3),
            )
        d.shape, d.opacity = shape, opacity
        return True

    # -- marks ------------------------------------------------------------------------
    def _build_marks(
        self, data: list[_SpotData], accepted: list[_SpotData], *, still: bool
    ) -> None:
        """Seed a mark from each confident spot; claim the spots that show its template."""
        claimed: set[int] = set()
        templates = {id(d): self._template_of(d) for d in accepted}

        # The largest clean template seeds first (then the spot seen in most
        # frames): a spot whose box caught only part of the mark never does.
        # Still camera: by the trimmed template (the crop reaches past the box,
        # so a cut box's whole shape can be as large as the mark's); moving: by
        # the spot's shape mass (the trimmed template's size lost moving-faint
        # at 432x240: a box grown over texture outranked the mark).
        def size(d: _SpotData) -> int:
            if still:
                tmpl = templates[id(d)][0]
                return int((tmpl > 0.2).sum()) if tmpl is not None else 0
            return int((d.shape > 0.2).sum()) if d.shape is not None else 0

        seeds = sorted(
            (d for d in accepted if templates[id(d)][0] is not None), key=lambda d: -size(d)
        )
        found_marks: list[tuple[torch.Tensor, list[tuple[int, int]], list[_SpotData]]] = []
        for seed in seeds:
            if id(seed) in claimed:
                continue
            tmpl, pos = templates[id(seed)]
            assert tmpl is not None
            th, tw = tmpl.shape
            if any(
                overlap((pos[1], pos[0], tw, th), (x, y, g[0].shape[1], g[0].shape[0])) > 0.5
                for g in found_marks
                for y, x in g[1]
            ):
                claimed.add(id(seed))
                self._reject(seed, "part of a larger mark found there")
                continue
            claimed.add(id(seed))
            spots, members = [pos], [seed]
            self._claim(tmpl, data, claimed, spots, members)
            # Moving scene: the template pooled over the spots and grown to the
            # whole mark (where a seed's box had cut it) is looked for again,
            # once, if it grew, among the candidates the blend model explained
            # (each search is an NCC over a spot's frames: ~0.15 s at 720p).
            for again in (True, False):
                if still:
                    break
                tmpl, spots = self._pool_shape(tmpl, spots, members)
                pooled = tmpl
                for _ in range(GROW_ROUNDS):
                    before = tmpl.shape
                    tmpl, spots = self._grow_shape(tmpl, spots, members)
                    if tmpl.shape == before:
                        break
                if not again or tmpl is pooled:
                    break
                if not self._claim(tmpl, accepted, claimed, spots, members):
                    break
            found_marks.append((tmpl, spots, members))
        for tmpl, spots, members in _merge_parts(found_marks, self._find_in):
            self._make_mark(tmpl, spots, members, still=still)
        for r in self.rejected:
            r.pop("_id", None)

    def _claim(
        self,
        tmpl: torch.Tensor,
        data: list[_SpotData],
        claimed: set[int],
        spots: list[tuple[int, int]],
        members: list[_SpotData],
    ) -> bool:
        """Add the spots not yet claimed that show `tmpl` to a mark's; whether any was new."""
        more = False
        for d in data:
            if id(d) in claimed:
                continue
            found = self._find_in(d, tmpl)
            if found is None:
                continue
            claimed.add(id(d))
            if all(abs(found[0] - y) + abs(found[1] - x) > 4 for y, x in spots):
                spots.append(found)
                members.append(d)
                more = True
            self.rejected = [r for r in self.rejected if r.get("_id") != id(d)]
        return more

    def _pool_shape(
        self, tmpl: torch.Tensor, spots: list[tuple[int, int]], members: list[_SpotData]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The template again from the median of all its spots' frames, a little wider.

        One spot's median keeps some of its background and its detection box
        may have cut part of the mark (a faint glyph beside the word); over
        all spots the backgrounds differ and the mark is what stays. Parts of
        the new shape connected to the old one are kept.
        """
        th, tw = tmpl.shape
        g = GROW
        windows = []
        for (sy, sx), d in zip(spots, members, strict=True):
            cy, cx = sy - g - d.y0, sx - g - d.x0
            if cy < 0 or cx < 0 or cy + th + 2 * g > d.h or cx + tw + 2 * g > d.w:
                continue
            windows.append(
                torch.from_numpy(np.stack(d.on_y)[:, cy : cy + th + 2 * g, cx : cx + tw + 2 * g])
            )
        if windows:
            # One threshold over every spot's frames: a spot whose frames seldom
            # show the mark (a faint mark over busy texture) would otherwise
            # have its best-looking junk frames called "showing".
            canvas = torch.zeros(th + 2 * g, tw + 2 * g)
            canvas[g : g + th, g : g + tw] = tmpl
            every = torch.cat(windows)
            windows = [every[_shows(every, canvas)].float()]
        if not windows or sum(len(w) for w in windows) < 8:
            return tmpl, spots
        pooled = median0(torch.cat(windows))
        new = shape_from_frames(pooled[None, None], ring=3)
        old = torch.zeros_like(new, dtype=torch.bool)
        old[g : g + th, g : g + tw] = tmpl > 0.15
        grown = F.max_pool2d((new > 0.15).float()[None, None], 5, 1, 2)[0, 0].numpy() > 0
        _, labels = cv2.connectedComponents(grown.astype(np.uint8))
        touching = set(np.unique(labels[old.numpy() & grown]).tolist()) - {0}
        if not touching:
            return tmpl, spots
        keep = torch.from_numpy(np.isin(labels, list(touching)))
        new = torch.where(keep, new, torch.zeros_like(new))
        ys_, xs_ = torch.nonzero(new > 0.02, as_tuple=True)
        ty0, tx0 = int(ys_.min()), int(xs_.min())
        out = new[ty0 : int(ys_.max()) + 1, tx0 : int(xs_.max()) + 1].contiguous()
        if int((out > 0.2).sum()) > MAX_GROWTH * int((tmpl > 0.2).sum()):
            # grown far past the part the boxes found: background came with it
            return tmpl, spots
        return out, [(sy - g + ty0, sx - g + tx0) for sy, sx in spots]

    def _grow_shape(
        self, tmpl: torch.Tensor, spots: list[tuple[int, int]], members: list[_SpotData]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The template again from the median of all its spots' frames, grown to the mark.

        One spot's median keeps some of its background and its detection box
        may have cut part of the mark (a glyph beside the word, a last
        letter); over all spots the backgrounds differ and the mark is what
        stays. The median is taken over a window reaching `REACH` times the
        template's height past it on every side (per pixel over the spots
        whose crops hold it); a stroke counts only where it stands out of
        every one of those spots' own medians (scene content one spot's few
        frames kept does not), and parts are added while one lies within
        `LINK_SHARE` of the mark's height of what is kept: a mark's parts sit
        closer together than that.
        """
        th, tw = tmpl.shape
        reach = max(GROW, round(REACH * th))
        # the template's origin in each spot's crop (it lies inside every crop)
        origins = [(sy - d.y0, sx - d.x0) for (sy, sx), d in zip(spots, members, strict=True)]
        # as far as some spot's crop reaches, and at every spot inside the frame
        fh, fw = self.r.info.height, self.r.info.width
        top = min(reach, max(oy for oy, _ in origins), *(sy for sy, _ in spots))
        left = min(reach, max(ox for _, ox in origins), *(sx for _, sx in spots))
        bottom = min(
            reach,
            max(d.h - oy - th for (oy, _), d in zip(origins, members, strict=True)),
            *(fh - sy - th for sy, _ in spots),
        )
        right = min(
            reach,
            max(d.w - ox - tw for (_, ox), d in zip(origins, members, strict=True)),
            *(fw - sx - tw for _, sx in spots),
        )
        if min(top, left, bottom, right) < 0:
            return tmpl, spots
        wh, ww = th + top + bottom, tw + left + right
        # each spot's frames in the window (NaN where its crop ends)
        stacks = []
        for (oy, ox), d in zip(origins, members, strict=True):
            y0, x0 = oy - top, ox - left
            cy0, cx0 = max(y0, 0), max(x0, 0)
            cy1, cx1 = min(y0 + wh, d.h), min(x0 + ww, d.w)
            s = np.full((len(d.on_y), wh, ww), np.nan, np.float32)
            s[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = np.stack(d.on_y)[:, cy0:cy1, cx0:cx1]
            stacks.append((s, (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0)))
        every = np.concatenate([s for s, _ in stacks])
        # One threshold over every spot's frames, on the template's box (inside
        # every crop): a spot whose frames seldom show the mark (a faint mark
        # over busy texture) would otherwise have its best-looking junk frames
        # called "showing".
        core = torch.from_numpy(every[:, top : top + th, left : left + tw])
        shows = _shows(core, tmpl).numpy()
        if int(shows.sum()) < 8:
            return tmpl, spots
        showing = every[shows]
        thin = np.isfinite(showing).sum(0) < 8
        pooled = _nanmedian0(showing)
        pooled = np.where(thin, np.nanmean(pooled[~thin]), pooled).astype(np.float32)
        canvas = np.zeros((wh, ww), np.float32)
        canvas[top : top + th, left : left + tw] = tmpl.numpy()
        own = canvas > 0.15
        near = cv2.dilate(own.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        sign, level = _polarity(showing, pooled, near & ~thin)
        # The least contrast over the spots holding a pixel, each spot's frames
        # in an early and a late half: the mark stays where it is while the
        # scene moves, so what one spot's median (or one half of it) kept of the
        # scene does not stand out of every one of them.
        least = np.full((wh, ww), np.inf, np.float32)
        k = 0
        for s, (y0, y1, x0, x1) in stacks:
            own_frames = s[shows[k : k + len(s)], y0:y1, x0:x1]
            k += len(s)
            half = len(own_frames) // 2
            for part in (own_frames[:half], own_frames[half:]) if half >= 3 else (own_frames,):
                if len(part) < 3:
                    continue
                hp = _highpass(median0(torch.from_numpy(part))[None])[0].numpy()
                least[y0:y1, x0:x1] = np.minimum(least[y0:y1, x0:x1], sign * hp)
        strokes = (least > 0.25 * level) & np.isfinite(least) & ~thin
        on_own = strokes & own
        if not on_own.any():
            return tmpl, spots
        new = _shape_in_median(pooled, on_own, strokes, sign)
        new[torch.from_numpy(thin)] = 0
        # Parts are linked within a share of the mark's height (the template's
        # rows, robust to a few specks); specks do not carry the link on.
        lo, hi = np.quantile(np.nonzero(own)[0], [0.02, 0.98])
        link = max(2, round(LINK_SHARE * (hi - lo + 1)))
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            (new > 0.15).numpy().astype(np.uint8)
        )
        speck = max(MIN_PART_PIXELS, PART_SHARE * int(own.sum()))
        labels[np.isin(labels, np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < speck))] = 0
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * link + 1, 2 * link + 1))
        kept, parts = own.copy(), set()
        while True:
            reach_of = cv2.dilate(kept.astype(np.uint8), kernel) > 0
            more = set(np.unique(labels[reach_of]).tolist()) - {0} - parts
            if not more:
                break
            parts |= more
            kept |= np.isin(labels, sorted(more))
        # Not within 2 px of the template's own parts: there the two estimates'
        # edges differ by a fringe, not by a part of the mark.
        added = np.isin(labels, sorted(parts)) & ~near
        if not added.any():
            return tmpl, spots
        added = cv2.dilate(added.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        grown = np.where(own, canvas, np.where(added, new.numpy(), 0.0))
        ys_, xs_ = np.nonzero(grown > 0.02)
        ty0, tx0 = int(ys_.min()), int(xs_.min())
        out = torch.from_numpy(
            np.ascontiguousarray(grown[ty0 : ys_.max() + 1, tx0 : xs_.max() + 1], np.float32)
        )
        if int((out > 0.2).sum()) > MAX_GROWTH * int((tmpl > 0.2).sum()):
            # grown far past the part the boxes found: background came with it
            return tmpl, spots
        return out, [(sy - top + ty0, sx - left + tx0) for sy, sx in spots]

    def _template_of(self, d: _SpotData) -> tuple[torch.Tensor | None, tuple[int, int]]:
        """The spot's shape cleaned and trimmed to the mark, and its top-left in the frame."""
        assert d.shape is not None
        # Its clear strokes grown by 2 px (speckle of the noise floor farther out
        # is dropped), within the box where the detector saw structure.
        core = F.max_pool2d((d.shape > 0.15).float()[None, None], 5, 1, 2)[0, 0] > 0
        inside = torch.zeros_like(core)
        by0, bx0 = max(d.spot.y - d.y0 - 4, 0), max(d.spot.x - d.x0 - 4, 0)
        inside[by0 : d.spot.y - d.y0 + d.spot.h + 4, bx0 : d.spot.x - d.x0 + d.spot.w + 4] = True
        core &= inside
        if not bool((d.shape[core] > 0.15).any()):
            self._reject(d, "no shape inside the detected box")
            return None, (0, 0)
        shape = torch.where(core, d.shape, torch.zeros_like(d.shape))
        ys, xs = torch.nonzero(shape > 0.02, as_tuple=True)
        ty0, tx0 = int(ys.min()), int(xs.min())
        tmpl = shape[ty0 : int(ys.max()) + 1, tx0 : int(xs.max()) + 1].contiguous()
        if int((tmpl > 0.2).sum()) < MIN_MARK_PIXELS:
            self._reject(d, "too small to be told from texture", pixels=int((tmpl > 0.2).sum()))
            return None, (0, 0)
        return tmpl, (d.y0 + ty0, d.x0 + tx0)

    def _find_in(
        self, d: _SpotData, tmpl: torch.Tensor, level: float = SAME_MARK_NCC
    ) -> tuple[int, int] | None:
        """Where `tmpl` shows in the spot's frames (high-passed NCC >= `level`), if it does."""
        th, tw = tmpl.shape
        if not d.on_y or d.h < th or d.w < tw:
            return None
        if d.off_y and not self.det_moving:
            # Still camera: the mark's imprint |median on - median off| = a |W - I|
            # without the scene's texture, which dilutes the NCC of a whole frame
            # (0.4 on a lossless clip's grain against 0.6 through H.264).
            on = median0(torch.from_numpy(np.stack(d.on_y)).float())
            off = median0(torch.from_numpy(np.stack(d.off_y)).float())
            crops, need = _highpass((on - off).abs()[None]), 1
        else:
            step = max(1, math.ceil(len(d.on_y) / TEST_FRAMES))
            crops, need = _highpass(torch.from_numpy(np.stack(d.on_y[::step])).float()), 2
        scores = ncc_map(crops, _highpass(tmpl[None].float())[0])
        best = scores.flatten(1).max(1)
        good = best.values >= level
        if int(good.sum()) < need and self.det_moving:
            # A faint mark over a busy moving scene scores below `level`, but the
            # scene's texture matches the template at a different place in
            # every frame while the mark stays put: frames whose best match
            # falls on the same pixel (within 1 px) are evidence too.
            fair = best.values >= AGREE_NCC
            if int(fair.sum()) >= AGREE_FRAMES:
                ys = torch.div(best.indices, scores.shape[2], rounding_mode="floor")
                xs = best.indices % scores.shape[2]
                my, mx = int(torch.mode(ys[fair]).values), int(torch.mode(xs[fair]).values)
                agree = fair & ((ys - my).abs() <= 1) & ((xs - mx).abs() <= 1)
                if int(agree.sum()) >= AGREE_FRAMES:
                    good = agree
        if int(good.sum()) < need and self.det_moving and len(d.on_idx) == len(d.on_y):
            # Over a very busy background (texture several times the mark's
            # contrast) even that fails; within a detection window the mark
            # stays while the scene moves, so the mean of the window's
            # high-passed frames keeps it and averages the texture down.
            hp = _highpass(torch.from_numpy(np.stack(d.on_y)).float())
            cuts = [0] + [k for k in range(1, len(d.on_idx)) if d.on_idx[k] != d.on_idx[k - 1] + 1]
            groups = [hp[a:b].mean(0) for a, b in zip(cuts, [*cuts[1:], len(hp)], strict=True)]
            scores = ncc_map(torch.stack(groups), _highpass(tmpl[None].float())[0])
            best = scores.flatten(1).max(1)
            good = best.values >= level
            need = 1
        if int(good.sum()) < need:
            return None
        # the position most of the frames that show it agree on
        oy, ox = divmod(int(torch.mode(best.indices[good]).values), scores.shape[2])
        return d.y0 + oy, d.x0 + ox

    def _make_mark(
        self,
        tmpl: torch.Tensor,
        spots: list[tuple[int, int]],
        members: list[_SpotData],
        *,
        still: bool,
    ) -> None:
        from worker.media.overlay import MARGIN, Region

        r = self.r
        fh, fw = r.info.height, r.info.width
        th, tw = tmpl.shape
        h = min(_even_floor(th + 2 * MARGIN + 1) + 2, _even_floor(fh))
        w = min(_even_floor(tw + 2 * MARGIN + 1) + 2, _even_floor(fw))
        ri = len(r.regions)
        # A spot must hold the whole template inside the frame (a grown template
        # or a match at the edge may not).
        fits = [
            (sp, d)
            for sp, d in zip(spots, members, strict=True)
            if sp[0] >= 0 and sp[1] >= 0 and sp[0] + th <= fh and sp[1] + tw <= fw
        ]
        if not fits:
            for d in members:
                self._reject(d, "too close to the frame's edge to analyse")
            return
        spots, members = [sp for sp, _ in fits], [d for _, d in fits]
        # Aligned crops of every spot (frames that show it), grouped by the mark's
        # offset in the crop (chroma is aligned on even pixels).
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray, bool]]] = {}
        for si, ((sy, sx), d) in enumerate(zip(spots, members, strict=True)):
            pl = r._template_placement(sy, sx, h, w, ri)
            cy, cx = pl.y0 - d.y0, pl.x0 - d.x0
            if cy < 0 or cx < 0 or cy + h > d.h or cx + w > d.w:
                continue
            canvas = torch.zeros(h, w)
            oy, ox = pl.offset
            canvas[oy : oy + th, ox : ox + tw] = tmpl[: h - oy, : w - ox]
            # on and off frames under one threshold (see `_explain_still`)
            frames_y, frames_uv = d.on_y + d.off_y, d.on_uv + d.off_uv
            ys = np.stack([yc[cy : cy + h, cx : cx + w] for yc in frames_y])
            uvs = np.stack(
                [uvc[:, cy // 2 : (cy + h) // 2, cx // 2 : (cx + w) // 2] for uvc in frames_uv]
            )
            shows = _shows(torch.from_numpy(ys), canvas).numpy()
            for k in range(len(ys)):
                on = k < len(d.on_y)
                if bool(shows[k]) == on:
                    groups.setdefault(pl.offset, []).append((si, ys[k], uvs[k], on))
        if not groups:
            for d in members:
                self._reject(d, "too close to the frame's edge to analyse")
            return
        offset = max(groups, key=lambda k: sum(g[3] for g in groups[k]))
        items = groups[offset]
        oy, ox = offset
        canvas = torch.zeros(h, w)
        canvas[oy : oy + th, ox : ox + tw] = tmpl[: h - oy, : w - ox]
        on_y = [y for _, y, _, on in items if on]
        on_uv = [uv for _, _, uv, on in items if on]
        if len(on_y) < 3:
            for d in members:
                self._reject(d, "seen in too few frames to analyse")
            return
        if still:
            fitted = _refine_still(items, len(spots))
        else:
            step = max(1, math.ceil(len(on_y) / MATTE_FRAMES))
            fitted = _refine_moving(on_y[::step], on_uv[::step], canvas, r.options)
        if fitted is None:
            for d in members:
                self._reject(d, "the joint matte is not a blend")
            return
        alpha, colour = fitted
        opacity = (
            float(torch.quantile(alpha[alpha > 0.02], 0.99)) if bool((alpha > 0.02).any()) else 0.0
        )
        if not (MIN_OPACITY <= opacity < MAX_OPACITY):
            for d in members:
                self._reject(d, "the joint matte is not a blend", opacity=round(opacity, 3))
            return
        shape = (alpha / opacity).clamp(0, 1)
        region = Region(h=h, w=w, shape=shape.to(r.device), template=False)
        r._estimate(
            region,
            on_y,
            on_uv,
            template=True,
            opacity=opacity,
            colour=tuple(float(c) for c in colour),  # type: ignore[arg-type]
        )
        assert region.shape is not None
        if still and region.noise_y is not None and _inversion_beats_fill(region, items):
            # The hybrid's noise model splits inversion's and the fill's errors
            # by how they grow with the matte and the distance to known pixels,
            # which a solid glyph's middle confounds (measured: inversion judged
            # 190 times worse than the fill where it was 500 times better). A
            # still camera shows the truth: the frames without the mark.
            region.noise_y = None
            region.alpha_stats["noise_y"] = "inversion beats the fill on the frames without it"
        region.shape = region.shape[oy : oy + th, ox : ox + tw].contiguous()
        region.template = True
        region._alphas.clear()
        region._plans.clear()
        r.regions.append(region)
        mark = AutoMark(ri, spots, still, [False] * len(spots))
        mark.size = (th, tw)
        self.marks.append(mark)
        for (sy, sx), d in zip(spots, members, strict=True):
            r.detected.append({"x": sx, "y": sy, "w": tw, "h": th, "score": d.score})

    # -- restore: per frame, where is each mark ------------------------------------
    def placements(self, frames: list, first_index: int) -> list[list[Placement]]:
        """Per frame of the batch, the placements of the marks present in it."""
        out: list[list[Placement]] = [[] for _ in frames]
        if not self.marks:
            return out
        views = [vio.plane_views(f) for f in frames]
        for m in self.marks:
            region = self.r.regions[m.region]
            for si, (sy, sx) in enumerate(m.spots):
                pl = self.r._template_placement(sy, sx, region.h, region.w, m.region)
                ratios = self._ratios(region, pl, views)
                for k, ratio in enumerate(ratios):
                    idx = first_index + k
                    limit = STAY_RATIO if m.state[si] else ENTER_RATIO
                    present = ratio < limit
                    m.state[si] = present
                    if present:
                        out[k].append(pl)
                        self._extend_run(m, si, idx, 1 - ratio)
        return out

    def _ratios(self, region: Region, pl: Placement, views: list) -> list[float]:
        """How much of the mark's pattern is left after inverting the blend at `pl`, per frame.

        The correlation of the crop's gradients with the matte's, after
        inverting over before (batched), in Y and U/V together: a mark that is
        there imprints its matte's edges on the crop and inverting removes them
        (after ~ 0, before well above); inverting where it is not imprints
        their negative (after well above, before ~ 0). Each plane counts by its
        own |covariance| with the matte, so a coloured mark whose luma is close
        to the scene's is judged mostly on U/V. A ratio of gradient *energies*
        instead would also count the background's own edges, which inverting
        brings back amplified: on a textured background a mark that was there
        was judged absent.

        Only the box of pixels the gradients on the matte's support read is
        cropped, inverted and differentiated (`_Probe`): the same numbers as
        on the whole crop, for a third of the work at 720p.
        """
        key = (pl.region, pl.offset)
        if key not in self._probes:
            self._probes[key] = _probes(region, pl.offset)
        assert region.colour_y is not None and region.colour_uv is not None
        colours = [region.colour_y, region.colour_uv[0:1], region.colour_uv[1:2]]
        before = after = norm = None
        for c, probe in enumerate(self._probes[key]):
            y0, x0 = (pl.y0, pl.x0) if c == 0 else (pl.y0 // 2, pl.x0 // 2)
            y0, x0 = y0 + probe.y0, x0 + probe.x0
            crops = np.stack([v[c][y0 : y0 + probe.h, x0 : x0 + probe.w] for v in views])
            j = self.r.stager.to_device(crops).float()
            inv = invert_blend(j[:, None], probe.alpha, colours[c])[:, 0]
            g_j = gradients(j).flatten(2).index_select(2, probe.support)
            g_i = gradients(inv).flatten(2).index_select(2, probe.support)
            b = (g_j * probe.g_a).sum((1, 2)).abs()
            a = (g_i * probe.g_a).sum((1, 2)).abs()
            n = g_j.flatten(1).norm(dim=1) + g_i.flatten(1).norm(dim=1)
            before = b if before is None else before + b
            after = a if after is None else after + a
            norm = n if norm is None else norm + n
        assert before is not None and after is not None and norm is not None
        # |covariances| summed over planes; each side over the same norm, so the
        # ratio is that of the two correlations
        return (after / before.clamp_min(1e-3 * norm.clamp_min(1.0))).tolist()

    def _extend_run(self, m: AutoMark, si: int, idx: int, score: float) -> None:
        last = next((r for r in reversed(m.runs) if r["spot"] == si), None)
        if last is not None and last["end_frame"] == idx - 1:
            last["end_frame"] = idx
            last["min_score"] = round(min(last["min_score"], score), 3)
            return
        region = self.r.regions[m.region]
        th, tw = region.shape.shape if region.shape is not None else (0, 0)
        y, x = m.spots[si]
        m.runs.append(
            {
                "spot": si,
                "start_frame": idx,
                "end_frame": idx,
                "box": {"x": x, "y": y, "w": int(tw), "h": int(th)},
                "min_score": round(score, 3),
            }
        )

    # -- report ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What report.json says about auto mode."""
        det = self.det
        return {
            "scene": None if det is None else ("moving" if det.moving else "still"),
            "windows": 0 if det is None else len(det.starts),
            "candidates": self.candidates,
            "marks": [
                {
                    "mark": i,
                    "region": m.region,
                    "spots": [{"y": y, "x": x} for y, x in m.spots],
                    "runs": [{k: v for k, v in run.items() if k != "spot"} for run in m.runs],
                    "mask": _mask_rle(self.r.regions[m.region].shape),
                    "frames_with_mark": sum(
                        run["end_frame"] - run["start_frame"] + 1 for run in m.runs
                    ),
                }
                for i, m in enumerate(self.marks)
            ],
            "rejected": self.rejected,
        }


def blend_fit(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One matte `a` (h, w) and colour `W` (3,) explaining `J - I = a (W - I)` for every pair.

    Each pair is (J, I) (3, h, w): the same mark over a known background (a
    still camera's frames with and without it, at one or several spots).
    Alternates the per-pixel least squares for `a` given `W` and for `W`
    given `a`; three planes and one unknown per pixel make `W` determined.
    """
    diffs = [j - i for j, i in pairs]
    mag = torch.stack([d.norm(dim=0) for d in diffs]).mean(0)
    strong = mag >= torch.quantile(mag, 0.97)
    sign = 1.0 if float(torch.stack([d[0][strong].mean() for d in diffs]).mean()) > 0 else -1.0
    w = torch.stack(
        [
            (i[:, strong] + d[:, strong] / 0.5).mean(1)
            for (_, i), d in zip(pairs, diffs, strict=True)
        ]
    ).mean(0)
    w = w.clamp(0, 255)
    if sign < 0:
        w[0] = min(float(w[0]), 40.0)
    a = torch.zeros_like(mag)
    for _ in range(20):
        num = torch.zeros_like(mag)
        den = torch.zeros_like(mag)
        for (_, i), d in zip(pairs, diffs, strict=True):
            wi = w.view(3, 1, 1) - i
            num += (d * wi).sum(0)
            den += (wi * wi).sum(0)
        a = (num / den.clamp_min(1.0)).clamp(0, 0.98)
        top = torch.zeros(3)
        for (_, i), d in zip(pairs, diffs, strict=True):
            top += (a[None] * (d + a[None] * i)).sum((1, 2))
        w = (top / (len(pairs) * (a * a).sum()).clamp_min(1e-6)).clamp(0, 255)
    return a, w


def _refine_still(items: list, n_spots: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Joint matte over all spots from their aligned on / off crops (still camera)."""
    pairs = []
    for si in range(n_spots):
        on = [(y, uv) for s, y, uv, o in items if s == si and o]
        off = [(y, uv) for s, y, uv, o in items if s == si and not o]
        if not on or not off:
            continue

        def median(frames: list) -> torch.Tensor:
            y = np.stack([f[0] for f in frames])[:, None]
            uv = _upsample_uv(np.stack([f[1] for f in frames]))
            return median0(torch.from_numpy(np.concatenate([y, uv], 1)).float())

        pairs.append((median(on), median(off)))
    if not pairs:
        return None
    a, w = blend_fit(pairs)
    a, w = _refit_on_core(pairs, a, w)
    ring = border_mask(a.shape[0], a.shape[1], 3, a.device)
    noise = float(a[ring].std())
    a = torch.where(a > max(3 * noise, 0.02), a, torch.zeros_like(a))
    return a, w


def _refit_on_core(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], a: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacity and colour again from the mark's solid core, then the matte given them.

    The alternating per-pixel fit (`blend_fit`) trades the opacity against
    the colour (`a (W - I)` is nearly the same for a little less `a` and a
    little more `W` over a mid-grey background) and is pulled by the edges,
    where chroma (4:2:0, upsampled by repetition) does not follow the matte:
    measured 0.55 for 0.6 with a yellow whose luma was read 202 for 190.
    Inside the core every pixel has the same `a = o`, so over the core
    `J - I = o W - o I` is linear in the background I, whose variety pins
    both down: one least squares over the three planes, `o` shared.
    """
    # The background's exposure when the mark is on and when it is off differs
    # (a drift over time): per plane, the gain between the two medians where
    # the matte is clear of the mark.
    clear = torch.from_numpy(
        cv2.dilate((a > 0.01).to(torch.uint8).numpy(), np.ones((5, 5), np.uint8)) == 0
    )
    if int(clear.sum()) >= CORE_PIXELS:
        pairs = [
            (
                j,
                i
                * (
                    (j[:, clear] * i[:, clear]).sum(1) / (i[:, clear] ** 2).sum(1).clamp_min(1.0)
                ).view(3, 1, 1),
            )
            for j, i in pairs
        ]
    # solid pixels whose whole 2x2 chroma block is solid (crops start on even pixels)
    h2, w2 = a.shape[0] // 2, a.shape[1] // 2
    top = float(torch.quantile(a[a > 0.05], 0.95)) if bool((a > 0.05).any()) else 0.0
    solid = a[: 2 * h2, : 2 * w2] >= 0.8 * top
    blocks = solid.reshape(h2, 2, w2, 2).all(3).all(1)
    core = torch.zeros_like(a, dtype=torch.bool)
    core[: 2 * h2, : 2 * w2] = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)
    if int(core.sum()) < CORE_PIXELS:
        return a, w
    i = torch.cat([i[:, core] for _, i in pairs], 1).double()  # (3, N)
    d = torch.cat([(j - i)[:, core] for j, i in pairs], 1).double()
    n = i.shape[1]
    if float(i.std(1).norm()) < CORE_SPREAD:  # a flat background: o and W are not told apart
        return a, w
    # unknowns (o W_Y, o W_U, o W_V, o): d_c = (o W_c) - o I_c
    design = torch.zeros(3 * n, 4, dtype=torch.float64)
    for c in range(3):
        design[c * n : (c + 1) * n, c] = 1.0
        design[c * n : (c + 1) * n, 3] = -i[c]
    sol = torch.linalg.lstsq(design, d.reshape(-1, 1)).solution[:, 0]
    o = float(sol[3])
    if not MIN_OPACITY <= o < MAX_OPACITY:
        return a, w
    w = (sol[:3] / o).float().clamp(0, 255)
    # The matte given the colour: from luma alone where the mark's luma is far
    # from the background's (chroma, upsampled, does not follow the matte at
    # its edges), from all three planes elsewhere.
    num = torch.zeros(3, *a.shape)
    den = torch.zeros(3, *a.shape)
    for j, i_off in pairs:
        wi = w.view(3, 1, 1) - i_off
        num += (j - i_off) * wi
        den += wi * wi
    every = num.sum(0) / den.sum(0).clamp_min(1.0)
    luma = num[0] / den[0].clamp_min(1.0)
    sure = den[0] >= len(pairs) * LUMA_CONTRAST**2
    return torch.where(sure, luma, every).clamp(0, 0.98), w


def _inversion_beats_fill(region: Region, items: list) -> bool:
    """Still camera: whether inverting the mark's typical frame at each spot comes closer
    to the spot's typical frame without it than filling the mark does (luma)."""
    assert region.shape is not None and region.colour_y is not None
    alpha = (region.shape * region.opacity).cpu()
    mask = alpha > 0.02
    if not bool(mask.any()):
        return False
    m = mask.to(torch.uint8).numpy() * 255
    err_inv = err_fill = 0.0
    for si in sorted({s for s, _, _, _ in items}):
        on = [y for s, y, _, o in items if s == si and o]
        off = [y for s, y, _, o in items if s == si and not o]
        if not on or not off:
            continue
        j = median0(torch.from_numpy(np.stack(on)).float())
        i = median0(torch.from_numpy(np.stack(off)).float())
        clear = ~torch.from_numpy(cv2.dilate(m, np.ones((5, 5), np.uint8)) > 0)
        if bool(clear.any()):  # the exposure may have drifted between the two
            i = i * float((j[clear] * i[clear]).sum() / (i[clear] ** 2).sum().clamp_min(1.0))
        inv = invert_blend(j[None, None], alpha, region.colour_y.cpu()[:1])[0, 0]
        fill = fill_crops(j[None, None], m, region.opts_y or RestoreOptions())[0, 0]
        err_inv += float(((inv - i)[mask] ** 2).sum())
        err_fill += float(((fill - i)[mask] ** 2).sum())
    return 0 < err_inv < err_fill


def _refine_moving(
    on_y: list[np.ndarray], on_uv: list[np.ndarray], shape: torch.Tensor, opts: RestoreOptions
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-pixel matte and colour from many frames of a moving scene under the mark.

    The background under the mark is predicted in every frame by a harmonic
    fill of the mark's pixels from the ring around them; then per pixel
    `J_t - F_t = a (W - F_t)` is solved by least squares over the frames
    (the fill's errors follow the moving texture and average out), and `W`
    given `a`, alternately.
    """
    y = torch.from_numpy(np.stack(on_y)).float()[:, None]
    uv = torch.from_numpy(np.stack(on_uv)).float()
    mask_t = F.max_pool2d((shape > 0.02).float()[None, None], 3, 1, 1)[0, 0] > 0
    mask = mask_t.to(torch.uint8).numpy() * 255
    fill_opts = replace(opts, inpaint_algo="harmonic")
    f_y = fill_crops(y, mask, fill_opts)
    mask_uv = (F.max_pool2d(mask_t.float()[None, None], 2)[0, 0] > 0).to(torch.uint8).numpy() * 255
    f_uv = fill_crops(uv, mask_uv, fill_opts)
    o = fit_opacity(y, shape)
    a = (shape * max(o, 0.2)).clamp(0, 0.98)
    w = torch.tensor(255.0 if float((y - f_y)[:, 0][:, mask_t].mean()) > 0 else 0.0)
    for _ in range(10):
        w = ((a * (y - (1 - a) * f_y)).sum() / (y.shape[0] * (a * a).sum()).clamp_min(1e-6)).clamp(
            0, 255
        )
        d, e = y - f_y, w - f_y
        a = ((d * e).sum((0, 1)) / (e * e).sum((0, 1)).clamp_min(1e-3)).clamp(0, 0.98)
        a = torch.where(mask_t, a, torch.zeros_like(a))
    a_uv = downsample_alpha(a, 2)[None, None]
    w_uv = (a_uv * (uv - (1 - a_uv) * f_uv)).sum((0, 2, 3)) / (
        uv.shape[0] * (a_uv * a_uv).sum()
    ).clamp_min(1e-6)
    if not bool((a > 0.02).any()):
        return None
    return a, torch.cat([w.view(1), w_uv.clamp(0, 255)])


def _merge_parts(
    marks: list[tuple[torch.Tensor, list[tuple[int, int]], list[_SpotData]]],
    find: Any,
) -> list[tuple[torch.Tensor, list[tuple[int, int]], list[_SpotData]]]:
    """Fold a mark whose template is a part of another's (seeded from a box that cut
    it) into that one: its spots move by where the part sits in the larger template."""
    marks = sorted(marks, key=lambda m: -int((m[0] > 0.2).sum()))
    out: list[tuple[torch.Tensor, list[tuple[int, int]], list[_SpotData]]] = []
    for tmpl, spots, members in marks:
        th, tw = tmpl.shape
        for big, bspots, bmembers in out:
            bh, bw = big.shape
            if th > bh or tw > bw:
                continue
            scores = ncc_map(_highpass(big[None].float()), _highpass(tmpl[None].float())[0])[0]
            if float(scores.max()) < PART_NCC:
                continue
            # where the larger template sits at each of the part's spots
            for d in members:
                pos = find(d, big, PART_NCC)
                if pos is not None and all(
                    abs(pos[0] - by) + abs(pos[1] - bx) > 4 for by, bx in bspots
                ):
                    bspots.append(pos)
                    bmembers.append(d)
            break
        else:
            out.append((tmpl, list(spots), list(members)))
    return out


def _polarity(frames: np.ndarray, median: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """Whether the mark in `box` is lighter (+1) or darker (-1) than the scene, and its
    typical high-passed contrast in the frames' `median` (h, w).

    By the blend model: under the mark the scene's spread over the frames
    (K, h, w; NaN where not seen) shrinks by (1 - a), so of the two sides of
    the mark's edges (high-pass above and below zero) the mark's is the one
    that varies less. A template seeded from a spot may have either polarity
    (the median's shape can be the scene around the strokes); this does not
    depend on it.
    """
    hp = _highpass(torch.from_numpy(median)[None])[0].numpy()
    edge = float(np.quantile(np.abs(hp[box]), 0.9)) * 0.25
    light, dark = box & (hp > edge), box & (hp < -edge)
    if not light.any() or not dark.any():
        return 1.0, float(np.quantile(np.abs(hp[box]), 0.95))
    spread_light = float(np.median(np.nanstd(frames[:, light], axis=0)))
    spread_dark = float(np.median(np.nanstd(frames[:, dark], axis=0)))
    sign = 1.0 if spread_light <= spread_dark else -1.0
    return sign, float(np.quantile(sign * hp[box], 0.95))


def _shape_in_median(
    pooled: np.ndarray, known: np.ndarray, strokes: np.ndarray, sign: float
) -> torch.Tensor:
    """The shape (h, w) in [0, 1] of `strokes` in a median image, on the scale of `known`.

    The strokes grown a little, with the holes they enclose, are filled from
    around (OpenCV Telea) for the background; the shape is the median's
    difference to it (with the mark's sign) over that difference at the
    known part.
    """
    grown = cv2.dilate(strokes.astype(np.uint8), np.ones((5, 5), np.uint8))
    outside = grown.copy()
    cv2.floodFill(outside, np.zeros((grown.shape[0] + 2, grown.shape[1] + 2), np.uint8), (0, 0), 1)
    under = ((grown > 0) | (outside == 0)).astype(np.uint8) * 255
    background = cv2.inpaint(pooled, under, 3, cv2.INPAINT_TELEA)
    proj = sign * (pooled - background)
    scale = max(float(np.quantile(proj[known], 0.95)), 1e-3)
    shape = np.where(under > 0, np.clip(proj / scale, 0, 1), 0)
    return torch.from_numpy(shape.astype(np.float32))


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


def _yuv(ys: list[np.ndarray], uvs: list[np.ndarray]) -> torch.Tensor:
    """(K, 3, h, w) float: the crops' Y and U/V (upsampled) stacked."""
    both = np.concatenate([np.stack(ys)[:, None], _upsample_uv(np.stack(uvs))], 1)
    return torch.from_numpy(both).float()


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


@dataclass(frozen=True)
class _Probe:
    """What the presence test reads of one plane of a placed mark's crop.

    The gradients are taken on the matte's support (alpha > 0.02, grown by
    1 px); those read one pixel more around it, so only the box of that is
    cropped (`y0`, `x0`, `h`, `w` inside the plane's crop), and the support is
    kept as flat indices into the box, row-major like a boolean mask's.
    """

    y0: int
    x0: int
    h: int
    w: int
    #: the matte over the box, the support's flat indices in it, and the
    #: matte's gradients there, of unit norm (2, n)
    alpha: torch.Tensor
    support: torch.Tensor
    g_a: torch.Tensor


def _probes(region: Region, offset: tuple[int, int]) -> list[_Probe]:
    """The `_Probe` of the Y, U and V planes of `region` placed at `offset`."""
    a_y, a_uv = region.alphas(offset)
    out = []
    for a in (a_y, a_uv, a_uv):
        support = F.max_pool2d((a > 0.02).float()[None, None], 3, 1, 1)[0, 0] > 0
        g_a = gradients(a[None])[0][:, support]
        g_a = g_a / g_a.norm().clamp_min(1e-6)
        read = F.max_pool2d(support.float()[None, None], 3, 1, 1)[0, 0] > 0
        ys, xs = torch.nonzero(read, as_tuple=True)
        if len(ys) == 0:  # no support: an empty box reads nothing
            ys, xs = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        inside = support[y0:y1, x0:x1].flatten()
        out.append(
            _Probe(
                y0,
                x0,
                y1 - y0,
                x1 - x0,
                a[y0:y1, x0:x1].contiguous(),
                torch.nonzero(inside, as_tuple=True)[0].to(a.device),
                g_a,
            )
        )
    return out


def _nanmedian0(a: np.ndarray) -> np.ndarray:
    """`np.nanmedian(a, axis=0)` (NaN where a pixel has no value) for stacks whose NaNs
    come in a few patterns (spots' crops that end): per pattern, one plain median
    over the rows that hold values. The same numbers, ~3x faster than numpy's
    masked-array path for stacks under 600 frames (0.7 s at 720p)."""
    k = len(a)
    flat = a.reshape(k, -1)
    finite = np.isfinite(flat)
    out = np.full(flat.shape[1], np.nan, a.dtype)
    # one row of packed bits per pixel: which frames hold it
    patterns, first, inverse = np.unique(
        np.packbits(finite, axis=0).T, axis=0, return_index=True, return_inverse=True
    )
    inverse = inverse.reshape(-1)
    for p in range(len(patterns)):
        rows = np.flatnonzero(finite[:, first[p]])
        if len(rows):
            cols = np.flatnonzero(inverse == p)
            out[cols] = np.median(flat[np.ix_(rows, cols)], axis=0)
    return out.reshape(a.shape[1:])


def _highpass(y: torch.Tensor) -> torch.Tensor:
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


def _shows(y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Per crop (K, h, w), whether it shows `shape`: high-passed NCC against the typical one."""
    hp = _highpass(y.float())
    pat = _highpass(shape[None].float())[0]
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


def _mask_rle(shape: torch.Tensor | None) -> dict[str, Any]:
    """The mark's pixels (shape > MASK_LEVEL) as run lengths, row-major, zeros first."""
    if shape is None:
        return {"h": 0, "w": 0, "rle": []}
    flat = (shape > MASK_LEVEL).flatten().cpu().numpy().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    rle = np.diff(np.concatenate([[0], edges])).tolist()
    return {"h": int(shape.shape[0]), "w": int(shape.shape[1]), "rle": rle}


def mask_from_rle(mask: dict[str, Any]) -> np.ndarray:
    """The boolean (h, w) mask `_mask_rle` encoded."""
    out = np.zeros(mask["h"] * mask["w"], bool)
    pos, val = 0, False
    for n in mask["rle"]:
        out[pos : pos + n] = val
        pos, val = pos + n, not val
    return out.reshape(mask["h"], mask["w"])


def _window_frames(det: Detection, wi: int) -> range:
    s = det.starts[wi]
    return range(s, s + det.length)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two trimmed shapes are one mark: |NCC| at the best alignment."""
    if a.shape[0] * a.shape[1] < b.shape[0] * b.shape[1]:
        a, b = b, a
    pad = 4
    big = F.pad(a.float(), (pad + b.shape[1], pad + b.shape[1], pad + b.shape[0], pad + b.shape[0]))
    if b.shape[0] > big.shape[0] or b.shape[1] > big.shape[1]:
        return False
    ha, wa = a.shape
    hb, wb = b.shape
    if max(ha, hb) > 1.5 * min(ha, hb) or max(wa, wb) > 1.5 * min(wa, wb):
        return False
    return float(ncc_map(big[None], b.float())[0].max()) >= SAME_MARK_NCC
