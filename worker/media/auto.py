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
   its matte is estimated from the aligned crops of all its spots.
3. *restore*: at each of its spots, per frame, a mark is taken as present
   when inverting the blend there removes edge energy instead of adding it
   (`present_ratio`, with hysteresis); only then is the crop restored.
   Frames without the mark are left as they are.

`AutoPlanner.report()` gives what was found as runs (frames, box, score) and
every rejected candidate with its reason, for report.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.media import io as vio
from worker.media.detect import Detection, DetectPass, Spot, find_spots, gradients, overlap
from worker.media.locate import ncc_map
from worker.media.matte import border_mask, fit_opacity, shape_from_frames
from worker.media.restore import invert_blend

if TYPE_CHECKING:
    from worker.media.overlay import OverlayRemover, Placement, Region

#: crops kept per candidate spot for the analysis (small: a mark-sized box each)
SPOT_SAMPLES = 96
#: ... and frames without it (still camera: the reference it is blended on)
OFF_SAMPLES = 32
#: extra pixels around a detected box in the analysis crops
PAD = 24
#: a blended mark lets some of the scene through: above this it is opaque content
MAX_OPACITY = 0.9
MIN_OPACITY = 0.08
#: the blend model must explain this share of the on/off difference (still camera)
MIN_EXPLAINED = 0.75
#: two candidates are one mark when their shapes correlate this well
SAME_MARK_NCC = 0.6
#: per frame: the mark is present when inverting leaves at most this share of the
#: edge energy under it (entering) / keeps it present below the second (staying)
ENTER_RATIO = 0.92
STAY_RATIO = 1.0


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


class AutoPlanner:
    """Runs detect and analyse for an `OverlayRemover`, then decides placements per frame."""

    def __init__(self, remover: OverlayRemover) -> None:
        self.r = remover
        self.det: Detection | None = None
        self.marks: list[AutoMark] = []
        self.rejected: list[dict[str, Any]] = []
        self.candidates = 0
        self.min_ratio: dict[int, float] = {}

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
                    (d.on_y if on else d.off_y).append(y)
                    (d.on_uv if on else d.off_uv).append(uv)
                count[0] += 1
            return frames

        r._run("analyse", analyse)
        accepted = [d for d in data if self._explain(d, det.moving)]
        self._build_marks(accepted, still=not det.moving)
        self._second_chance([d for d in data if d not in accepted])

    def _spot_data(self, s: Spot, det: Detection) -> _SpotData:
        fh, fw = self.r.info.height, self.r.info.width
        y0, x0 = _even_floor(max(s.y - PAD, 0)), _even_floor(max(s.x - PAD, 0))
        h = _even_floor(min(s.y + s.h + PAD, fh) - y0)
        w = _even_floor(min(s.x + s.w + PAD, fw) - x0)
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
        self.rejected.append(
            {**d.spot.box(), "windows": len(d.spot.windows), "reason": reason, **extra}
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
        else:
            d.off_y, d.off_uv = [d.off_y[i] for i in idx], [d.off_uv[i] for i in idx]

    def _explain_still(self, d: _SpotData) -> bool:
        if not d.off_y:
            return self._reject(d, "still camera and never absent: cannot be told from the scene")
        if not self._fit_still(d):
            return False
        # Drop on-frames that do not show it and off-frames that do, then fit again.
        assert d.shape is not None
        keep_on = _shows(torch.from_numpy(np.stack(d.on_y)), d.shape)
        shows_off = _shows(torch.from_numpy(np.stack(d.off_y)), d.shape)
        if int(keep_on.sum()) < 3:
            return self._reject(d, "seen in too few frames to analyse")
        self._keep(d, keep_on)
        if bool(shows_off.all()):
            return self._reject(d, "still camera and never absent: cannot be told from the scene")
        self._keep(d, ~shows_off, on=False)
        return self._fit_still(d)

    def _fit_still(self, d: _SpotData) -> bool:
        on = np.concatenate([np.stack(d.on_y)[:, None], _upsample_uv(np.stack(d.on_uv))], 1)
        off = np.concatenate([np.stack(d.off_y)[:, None], _upsample_uv(np.stack(d.off_uv))], 1)
        j = torch.from_numpy(on).float().median(0).values  # (3, h, w)
        i_off = torch.from_numpy(off).float().median(0).values
        diff = j - i_off
        mag = diff.norm(dim=0)
        strong = mag >= torch.quantile(mag, 0.97)
        if float(mag[strong].mean()) < 6:
            return self._reject(d, "no consistent change between frames with and without it")
        # Alternate: the per-pixel alpha given W, and W given the alphas.
        sign = 1.0 if float(diff[0][strong].mean()) > 0 else -1.0
        w = (i_off[:, strong] + diff[:, strong] / 0.5).mean(1).clamp(0, 255)
        if sign < 0:
            w[0] = min(float(w[0]), 40.0)
        for _ in range(20):
            wi = w.view(3, 1, 1) - i_off
            a = ((diff * wi).sum(0) / (wi * wi).sum(0).clamp_min(1.0)).clamp(0, 0.98)
            num = (a[None] * (diff + a[None] * i_off)).sum((1, 2))
            w = (num / (a * a).sum().clamp_min(1e-6)).clamp(0, 255)
        wi = w.view(3, 1, 1) - i_off
        a = ((diff * wi).sum(0) / (wi * wi).sum(0).clamp_min(1.0)).clamp(0, 0.98)
        resid = diff - a[None] * wi
        on_mark = a > 0.05
        explained = 1 - float(
            (resid[:, on_mark] ** 2).sum() / (diff[:, on_mark] ** 2).sum().clamp_min(1e-6)
        )
        ring = border_mask(d.h, d.w, 3, a.device)
        noise = float(a[ring].std()) if bool(ring.any()) else 0.0
        opacity = float(torch.quantile(a[on_mark], 0.99)) if bool(on_mark.any()) else 0.0
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
        shape = shape_from_frames(y.median(0).values[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self._reject(d, "no static shape under the moving scene")
        # Frames of its windows that do not show it (it jumped mid-window) would
        # inflate the spread under it: keep the ones that do, and look again.
        keep = _shows(y[:, 0], shape)
        if int(keep.sum()) < 3:
            return self._reject(d, "seen in too few frames to analyse")
        self._keep(d, keep)
        y = y[keep]
        shape = shape_from_frames(y.median(0).values[None], ring=3)
        if int((shape > 0.2).sum()) < 12:
            return self._reject(d, "no static shape under the moving scene")
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
    def _build_marks(self, accepted: list[_SpotData], *, still: bool) -> None:
        from worker.media.overlay import MARGIN, Region

        r = self.r
        fh, fw = r.info.height, r.info.width
        # Trim each shape to its support: the template and where it sits in the frame.
        items = []
        for d in accepted:
            assert d.shape is not None
            # The mark's bounding box: its clear strokes grown by 2 px (speckle
            # of the noise floor farther out is dropped with it).
            core = F.max_pool2d((d.shape > 0.15).float()[None, None], 5, 1, 2)[0, 0] > 0
            # ... and within the box where the detector saw structure (plus a little)
            inside = torch.zeros_like(core)
            by0, bx0 = max(d.spot.y - d.y0 - 4, 0), max(d.spot.x - d.x0 - 4, 0)
            inside[by0 : d.spot.y - d.y0 + d.spot.h + 4, bx0 : d.spot.x - d.x0 + d.spot.w + 4] = (
                True
            )
            core &= inside
            if not bool((d.shape[core] > 0.15).any()):
                self._reject(d, "no shape inside the detected box")
                continue
            d.shape = torch.where(core, d.shape, torch.zeros_like(d.shape))
            ys, xs = torch.nonzero(d.shape > 0.02, as_tuple=True)
            ty0, tx0 = int(ys.min()), int(xs.min())
            ty1, tx1 = int(ys.max()) + 1, int(xs.max()) + 1
            tmpl = d.shape[ty0:ty1, tx0:tx1].contiguous()
            items.append((d, tmpl, d.y0 + ty0, d.x0 + tx0))
        groups: list[list[int]] = []
        for i, (_, tmpl, _, _) in enumerate(items):
            for g in groups:
                if _same_shape(items[g[0]][1], tmpl):
                    g.append(i)
                    break
            else:
                groups.append([i])
        # Largest marks first: a part of a mark (a letter its box caught alone) is dropped.
        groups.sort(key=lambda g: -max(int((items[i][1] > 0.2).sum()) for i in g))
        taken: list[tuple[int, int, int, int]] = []
        for g in groups:
            # The template: the spot seen in most frames; the others placed by NCC on their shape.
            g.sort(key=lambda i: (-len(items[i][0].on_y), -int((items[i][1] > 0.2).sum())))
            d0, tmpl, y0, x0 = items[g[0]]
            box = (x0, y0, tmpl.shape[1], tmpl.shape[0])
            if any(overlap(box, t) > 0.5 for t in taken):
                for i in g:
                    self._reject(items[i][0], "part of a larger mark found there")
                continue
            th, tw = tmpl.shape
            spots: list[tuple[int, int]] = [(y0, x0)]
            members = [d0]
            for i in g[1:]:
                d, _, _, _ = items[i]
                assert d.shape is not None
                if d.shape.shape[0] < th or d.shape.shape[1] < tw:
                    continue
                m = ncc_map(d.shape[None].float(), tmpl.float())[0]
                oy, ox = divmod(int(m.argmax()), m.shape[1])
                pos = (d.y0 + oy, d.x0 + ox)
                if pos not in spots:
                    spots.append(pos)
                    members.append(d)
            h = min(_even_floor(th + 2 * MARGIN + 1) + 2, _even_floor(fh))
            w = min(_even_floor(tw + 2 * MARGIN + 1) + 2, _even_floor(fw))
            ri = len(r.regions)
            region = Region(h=h, w=w, shape=tmpl, template=True)
            # Aligned crops of every spot, grouped by the mark's offset in the crop.
            ys_by: dict[tuple[int, int], list[np.ndarray]] = {}
            uvs_by: dict[tuple[int, int], list[np.ndarray]] = {}
            for (sy, sx), d in zip(spots, members, strict=True):
                pl = r._template_placement(sy, sx, h, w, ri)
                cy, cx = pl.y0 - d.y0, pl.x0 - d.x0
                if cy < 0 or cx < 0 or cy + h > d.h or cx + w > d.w:
                    continue
                for yc, uvc in zip(d.on_y, d.on_uv, strict=True):
                    ys_by.setdefault(pl.offset, []).append(yc[cy : cy + h, cx : cx + w])
                    uvs_by.setdefault(pl.offset, []).append(
                        uvc[:, cy // 2 : (cy + h) // 2, cx // 2 : (cx + w) // 2]
                    )
            if not ys_by:
                for d in members:
                    self._reject(d, "too close to the frame's edge to analyse")
                continue
            offset = max(ys_by, key=lambda k: len(ys_by[k]))
            oy, ox = offset
            canvas = torch.zeros(h, w, device=r.device)
            canvas[oy : oy + th, ox : ox + tw] = tmpl[: h - oy, : w - ox].to(r.device)
            region.template = False
            region.shape = canvas
            opacity = float(np.mean([d.opacity for d in members])) if still else None
            colour = None
            if still:
                cols = np.array([d.colour for d in members if d.colour is not None])
                colour = tuple(float(c) for c in cols.mean(0)) if len(cols) else None
            r._estimate(
                region, ys_by[offset], uvs_by[offset], template=True, opacity=opacity, colour=colour
            )
            assert region.shape is not None
            region.shape = region.shape[oy : oy + th, ox : ox + tw].contiguous()
            region.template = True
            region._alphas.clear()
            region._plans.clear()
            if not (MIN_OPACITY <= region.opacity < MAX_OPACITY):
                for d in members:
                    self._reject(
                        d, "the joint matte is not a blend", opacity=round(region.opacity, 3)
                    )
                continue
            r.regions.append(region)
            taken.extend((sx, sy, tw, th) for sy, sx in spots)
            self.marks.append(AutoMark(ri, spots, still, [False] * len(spots)))
            for d in members:
                r.detected.append({**d.spot.box(), "score": d.score})

    def _second_chance(self, others: list[_SpotData]) -> None:
        """Look for each found mark's template in the candidates that failed on their own.

        A spot visited briefly, or over a flat or busy background, may not give
        a shape of its own; the template from the mark's confident spots does.
        """
        for m in self.marks:
            region = self.r.regions[m.region]
            assert region.shape is not None
            tmpl = _highpass(region.shape[None].float())[0]
            th, tw = tmpl.shape
            for d in others:
                if not d.on_y or d.h < th or d.w < tw:
                    continue
                crops = _highpass(torch.from_numpy(np.stack(d.on_y)).float())
                scores = ncc_map(crops, tmpl)  # (K, h - th + 1, w - tw + 1)
                best = scores.flatten(1).max(1)
                if float(best.values.max()) < 0.6:
                    continue
                # the position where most frames agree, among those that show it well
                good = best.values >= 0.6
                pos = torch.mode(best.indices[good]).values
                oy, ox = divmod(int(pos), scores.shape[2])
                spot = (d.y0 + oy, d.x0 + ox)
                if all(abs(spot[0] - y) + abs(spot[1] - x) > 4 for y, x in m.spots):
                    m.spots.append(spot)
                    m.state.append(False)
                    self.rejected = [
                        r for r in self.rejected if (r.get("x"), r.get("y")) != (d.spot.x, d.spot.y)
                    ]
                    self.r.detected.append(
                        {
                            "x": spot[1],
                            "y": spot[0],
                            "w": tw,
                            "h": th,
                            "score": round(float(best.values.max()), 3),
                        }
                    )

    # -- restore: per frame, where is each mark ------------------------------------
    def placements(self, frames: list, first_index: int) -> list[list[Placement]]:
        """Per frame of the batch, the placements of the marks present in it."""
        out: list[list[Placement]] = [[] for _ in frames]
        if not self.marks:
            return out
        views = [vio.plane_views(f)[0] for f in frames]
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

    def _ratios(self, region: Region, pl: Placement, views: list[np.ndarray]) -> list[float]:
        """Edge energy after / before inverting the blend at `pl`, per frame (batched)."""
        a_y, _ = region.alphas(pl.offset)
        crops = np.stack([v[pl.y0 : pl.y0 + region.h, pl.x0 : pl.x0 + region.w] for v in views])
        j = self.r.stager.to_device(crops).float()
        assert region.colour_y is not None
        inv = invert_blend(j[:, None], a_y, region.colour_y)[:, 0]
        support = F.max_pool2d((a_y > 0.02).float()[None, None], 3, 1, 1)[0, 0] > 0
        e_j = (gradients(j) ** 2).sum(1)[:, support].sum(1)
        e_i = (gradients(inv) ** 2).sum(1)[:, support].sum(1)
        return (e_i / e_j.clamp_min(1e-6)).tolist()

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
                    "frames_with_mark": sum(
                        run["end_frame"] - run["start_frame"] + 1 for run in m.runs
                    ),
                }
                for i, m in enumerate(self.marks)
            ],
            "rejected": self.rejected,
        }


def _highpass(y: torch.Tensor) -> torch.Tensor:
    """(K, h, w) minus its 7x7 local mean: the mark's strokes without the scene's shading."""
    return y - F.avg_pool2d(y[:, None], 7, 1, 3, count_include_pad=False)[:, 0]


def _shows(y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Per crop (K, h, w), whether it shows `shape`: high-passed NCC against the typical one."""
    hp = _highpass(y.float())
    pat = _highpass(shape[None].float())[0]
    pat = pat - pat.mean()
    c = hp - hp.mean((1, 2), keepdim=True)
    ncc = (c * pat).sum((1, 2)) / (c.flatten(1).norm(dim=1) * pat.norm()).clamp_min(1e-6)
    # Frames with and without it form two clusters (about 0 and well above):
    # the threshold sits between the typical high score and zero.
    hi = float(torch.quantile(ncc, 0.9))
    lo = float(torch.quantile(ncc, 0.1))
    if -lo > hi:  # a dark mark correlates negatively with a bright template
        ncc, hi = -ncc, -lo
    return ncc >= max(0.08, 0.4 * hi)


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
