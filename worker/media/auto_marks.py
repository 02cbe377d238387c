"""`auto` mode: from the candidates the blend test accepted to marks.

Accepted candidates seed marks, largest first; each mark's template (its
clean, trimmed shape) is looked for in every other candidate (`find_in`), so
a spot seen briefly or over a flat background joins the mark found
elsewhere, and a candidate inside a found mark is "part of a larger mark".
Over a moving scene the template is pooled over all its spots and grown to
the whole mark where a box had cut it (`worker/media/auto_grow.py`), then
looked for again; a mark whose template is a part of another's is folded
into it (`merge_parts`). Each mark's matte is then fitted on the aligned
crops of all its spots (`worker/media/auto_matte.py`) and it becomes a
region of the `OverlayRemover`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from worker.media.auto_grow import grow_shape, pool_shape
from worker.media.auto_matte import (
    MAX_OPACITY,
    MIN_OPACITY,
    inversion_beats_fill,
    refine_moving,
    refine_still,
)
from worker.media.auto_spots import (
    TEST_FRAMES,
    Rejections,
    SpotData,
    even_floor,
    highpass,
    shows_mark,
)
from worker.media.auto_track import AutoMark
from worker.media.detect import median0, overlap
from worker.media.locate import ncc_map

if TYPE_CHECKING:
    from worker.media.overlay import OverlayRemover

#: a template needs this many clear pixels (shape > 0.2) to be looked for elsewhere:
#: a fragment of a few strokes matches texture anywhere
MIN_MARK_PIXELS = 64
#: a found mark's template that correlates this well with a part of a larger
#: one's is that mark, seeded from a box that cut it (`merge_parts`)
PART_NCC = 0.4
#: a template is grown at most this many times (each from what the last one kept)
GROW_ROUNDS = 3
#: a template shows at a spot when its high-passed NCC reaches this
SAME_MARK_NCC = 0.6
#: moving scene: a template below SAME_MARK_NCC still matches a spot when this many
#: sampled frames score at least AGREE_NCC at the same pixel (within 1 px)
AGREE_NCC = 0.35
AGREE_FRAMES = 4
#: frames the joint matte of a mark over a moving scene is fitted on
MATTE_FRAMES = 64

#: a mark being built: its template, its spots' top-left corners and their candidates
Found = tuple[torch.Tensor, list[tuple[int, int]], list[SpotData]]


class MarkBuilder:
    """Builds the marks of one video into its `OverlayRemover`'s regions."""

    def __init__(
        self, remover: OverlayRemover, *, still: bool, rejections: Rejections, threads: int = 1
    ) -> None:
        self.r, self.still, self.rejections = remover, still, rejections
        #: template searches run at once (`_claim`)
        self.threads = threads
        self.marks: list[AutoMark] = []

    def build(self, data: list[SpotData], accepted: list[SpotData]) -> list[AutoMark]:
        """Seed a mark from each confident spot; claim the spots that show its template."""
        still = self.still
        frame = (self.r.info.height, self.r.info.width)
        claimed: set[int] = set()
        templates = {id(d): self._template_of(d) for d in accepted}

        # The largest clean template seeds first (then the spot seen in most
        # frames): a spot whose box caught only part of the mark never does.
        # Still camera: by the trimmed template (the crop reaches past the box,
        # so a cut box's whole shape can be as large as the mark's); moving: by
        # the spot's shape mass (the trimmed template's size lost moving-faint
        # at 432x240: a box grown over texture outranked the mark).
        def size(d: SpotData) -> int:
            if still:
                tmpl = templates[id(d)][0]
                return int((tmpl > 0.2).sum()) if tmpl is not None else 0
            return int((d.shape > 0.2).sum()) if d.shape is not None else 0

        seeds = sorted(
            (d for d in accepted if templates[id(d)][0] is not None), key=lambda d: -size(d)
        )
        found_marks: list[Found] = []
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
                self.rejections.add(seed, "part of a larger mark found there")
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
                tmpl, spots = pool_shape(tmpl, spots, members)
                pooled = tmpl
                for _ in range(GROW_ROUNDS):
                    before = tmpl.shape
                    tmpl, spots = grow_shape(tmpl, spots, members, frame)
                    if tmpl.shape == before:
                        break
                if not again or tmpl is pooled:
                    break
                if not self._claim(tmpl, accepted, claimed, spots, members):
                    break
            found_marks.append((tmpl, spots, members))
        for tmpl, spots, members in merge_parts(found_marks, self._find):
            self._make_mark(tmpl, spots, members, still=still)
        return self.marks

    def _claim(
        self,
        tmpl: torch.Tensor,
        data: list[SpotData],
        claimed: set[int],
        spots: list[tuple[int, int]],
        members: list[SpotData],
    ) -> bool:
        """Add the spots not yet claimed that show `tmpl` to a mark's; whether any was new."""
        more = False
        todo = [d for d in data if id(d) not in claimed]
        # Each search is independent (an NCC over one spot's crops): they run
        # in parallel, and are taken in order.
        with ThreadPoolExecutor(self.threads) as pool:
            found_in = list(pool.map(lambda d: self._find(d, tmpl), todo))
        for d, found in zip(todo, found_in, strict=True):
            if found is None:
                continue
            claimed.add(id(d))
            if all(abs(found[0] - y) + abs(found[1] - x) > 4 for y, x in spots):
                spots.append(found)
                members.append(d)
                more = True
            self.rejections.drop(d)
        return more

    def _template_of(self, d: SpotData) -> tuple[torch.Tensor | None, tuple[int, int]]:
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
            self.rejections.add(d, "no shape inside the detected box")
            return None, (0, 0)
        shape = torch.where(core, d.shape, torch.zeros_like(d.shape))
        ys, xs = torch.nonzero(shape > 0.02, as_tuple=True)
        ty0, tx0 = int(ys.min()), int(xs.min())
        tmpl = shape[ty0 : int(ys.max()) + 1, tx0 : int(xs.max()) + 1].contiguous()
        if int((tmpl > 0.2).sum()) < MIN_MARK_PIXELS:
            self.rejections.add(
                d, "too small to be told from texture", pixels=int((tmpl > 0.2).sum())
            )
            return None, (0, 0)
        return tmpl, (d.y0 + ty0, d.x0 + tx0)

    def _make_mark(
        self,
        tmpl: torch.Tensor,
        spots: list[tuple[int, int]],
        members: list[SpotData],
        *,
        still: bool,
    ) -> None:
        from worker.media.overlay import MARGIN, Region

        r = self.r
        fh, fw = r.info.height, r.info.width
        th, tw = tmpl.shape
        h = min(even_floor(th + 2 * MARGIN + 1) + 2, even_floor(fh))
        w = min(even_floor(tw + 2 * MARGIN + 1) + 2, even_floor(fw))
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
                self.rejections.add(d, "too close to the frame's edge to analyse")
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
            # on and off frames under one threshold (see `BlendTest._still`)
            frames_y, frames_uv = d.on_y + d.off_y, d.on_uv + d.off_uv
            ys = np.stack([yc[cy : cy + h, cx : cx + w] for yc in frames_y])
            uvs = np.stack(
                [uvc[:, cy // 2 : (cy + h) // 2, cx // 2 : (cx + w) // 2] for uvc in frames_uv]
            )
            shows = shows_mark(torch.from_numpy(ys), canvas).numpy()
            for k in range(len(ys)):
                on = k < len(d.on_y)
                if bool(shows[k]) == on:
                    groups.setdefault(pl.offset, []).append((si, ys[k], uvs[k], on))
        if not groups:
            for d in members:
                self.rejections.add(d, "too close to the frame's edge to analyse")
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
                self.rejections.add(d, "seen in too few frames to analyse")
            return
        if still:
            fitted = refine_still(items, len(spots))
        else:
            step = max(1, math.ceil(len(on_y) / MATTE_FRAMES))
            fitted = refine_moving(on_y[::step], on_uv[::step], canvas, r.options)
        if fitted is None:
            for d in members:
                self.rejections.add(d, "the joint matte is not a blend")
            return
        alpha, colour = fitted
        opacity = (
            float(torch.quantile(alpha[alpha > 0.02], 0.99)) if bool((alpha > 0.02).any()) else 0.0
        )
        if not (MIN_OPACITY <= opacity < MAX_OPACITY):
            for d in members:
                self.rejections.add(d, "the joint matte is not a blend", opacity=round(opacity, 3))
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
        if still and region.noise_y is not None and inversion_beats_fill(region, items):
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

    def _find(
        self, d: SpotData, tmpl: torch.Tensor, level: float = SAME_MARK_NCC
    ) -> tuple[int, int] | None:
        return find_in(d, tmpl, moving=not self.still, level=level)


def find_in(
    d: SpotData, tmpl: torch.Tensor, *, moving: bool, level: float = SAME_MARK_NCC
) -> tuple[int, int] | None:
    """Where `tmpl` shows in the spot's frames (high-passed NCC >= `level`), if it does."""
    th, tw = tmpl.shape
    if not d.on_y or d.h < th or d.w < tw:
        return None
    if d.off_y and not moving:
        # Still camera: the mark's imprint |median on - median off| = a |W - I|
        # without the scene's texture, which dilutes the NCC of a whole frame
        # (0.4 on a lossless clip's grain against 0.6 through H.264).
        on = median0(torch.from_numpy(np.stack(d.on_y)).float())
        off = median0(torch.from_numpy(np.stack(d.off_y)).float())
        crops, need = highpass((on - off).abs()[None]), 1
    else:
        step = max(1, math.ceil(len(d.on_y) / TEST_FRAMES))
        crops, need = highpass(torch.from_numpy(np.stack(d.on_y[::step])).float()), 2
    scores = ncc_map(crops, highpass(tmpl[None].float())[0])
    best = scores.flatten(1).max(1)
    good = best.values >= level
    if int(good.sum()) < need and moving:
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
    if int(good.sum()) < need and moving and len(d.on_idx) == len(d.on_y):
        # Over a very busy background (texture several times the mark's
        # contrast) even that fails; within a detection window the mark
        # stays while the scene moves, so the mean of the window's
        # high-passed frames keeps it and averages the texture down.
        hp = highpass(torch.from_numpy(np.stack(d.on_y)).float())
        cuts = [0] + [k for k in range(1, len(d.on_idx)) if d.on_idx[k] != d.on_idx[k - 1] + 1]
        groups = [hp[a:b].mean(0) for a, b in zip(cuts, [*cuts[1:], len(hp)], strict=True)]
        scores = ncc_map(torch.stack(groups), highpass(tmpl[None].float())[0])
        best = scores.flatten(1).max(1)
        good = best.values >= level
        need = 1
    if int(good.sum()) < need:
        return None
    # the position most of the frames that show it agree on
    oy, ox = divmod(int(torch.mode(best.indices[good]).values), scores.shape[2])
    return d.y0 + oy, d.x0 + ox


def merge_parts(
    marks: list[Found], find: Callable[[SpotData, torch.Tensor, float], tuple[int, int] | None]
) -> list[Found]:
    """Fold a mark whose template is a part of another's (seeded from a box that cut
    it) into that one: its spots move by where the part sits in the larger template."""
    marks = sorted(marks, key=lambda m: -int((m[0] > 0.2).sum()))
    out: list[Found] = []
    for tmpl, spots, members in marks:
        th, tw = tmpl.shape
        for big, bspots, bmembers in out:
            bh, bw = big.shape
            if th > bh or tw > bw:
                continue
            scores = ncc_map(highpass(big[None].float()), highpass(tmpl[None].float())[0])[0]
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
