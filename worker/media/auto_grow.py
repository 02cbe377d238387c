"""`auto` mode: a mark's template grown to the whole mark from all its spots.

One spot's median keeps some of its background, and its detection box may
have cut part of the mark (a faint glyph beside the word, a last letter
over a busy background). Over all the spots of a mark the backgrounds
differ and the mark is what stays: `pool_shape` takes the template again
from the median of every spot's frames that show it, a little wider;
`grow_shape` reaches farther and adds the parts that stand out of every
spot's own median, near what is kept.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media.auto_spots import SpotData, highpass, shows_mark
from worker.media.detect import median0
from worker.media.matte import shape_from_frames

#: the template is looked for again this many pixels around it (`pool_shape`)
GROW = 10
#: ... over a window this many times its height past it (`grow_shape`)
REACH = 1.5
#: ... its parts joined when this share of its height apart
LINK_SHARE = 0.5
#: ... of parts at least this large (pixels, and share of the template's)
MIN_PART_PIXELS = 8
PART_SHARE = 0.01
#: ... and the grown template may hold at most this many times the pixels it had
MAX_GROWTH = 2.0


def pool_shape(
    tmpl: torch.Tensor, spots: list[tuple[int, int]], members: list[SpotData]
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
        windows = [every[shows_mark(every, canvas)].float()]
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


def grow_shape(
    tmpl: torch.Tensor,
    spots: list[tuple[int, int]],
    members: list[SpotData],
    frame_size: tuple[int, int],
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
    fh, fw = frame_size
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
    shows = shows_mark(core, tmpl).numpy()
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
            hp = highpass(median0(torch.from_numpy(part))[None])[0].numpy()
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
    _, labels, stats, _ = cv2.connectedComponentsWithStats((new > 0.15).numpy().astype(np.uint8))
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
    hp = highpass(torch.from_numpy(median)[None])[0].numpy()
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
