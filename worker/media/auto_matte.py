"""`auto` mode's mattes: one matte and one colour that explain a mark's crops.

The blend model is `J = (1 - a) I + a W`: a mark of colour `W` laid over the
scene `I` with a matte `a`. With a still camera the scene under the mark is
seen in the frames without it, so the fit is on pairs of typical frames with
and without it (`blend_fit`, `refine_still`, then `refit_on_core` on the
mark's solid core); over a moving scene the background under the mark is
predicted in every frame by a fill from the ring around it
(`refine_moving`). `inversion_beats_fill` tells, with a still camera,
whether inverting the blend beats filling the mark (it decides the restore's
mix for that mark).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media.auto_spots import upsample_uv
from worker.media.detect import median0
from worker.media.matte import border_mask, downsample_alpha, fit_opacity
from worker.media.restore import RestoreOptions, fill_crops, invert_blend

if TYPE_CHECKING:
    from worker.media.overlay import Region

#: a blended mark lets some of the scene through: above this it is opaque content
MAX_OPACITY = 0.9
MIN_OPACITY = 0.08
#: still camera: the opacity and colour are fitted again on the mark's solid core
#: when it has this many pixels and its background this spread (grey levels)
CORE_PIXELS = 24
CORE_SPREAD = 6.0
#: ... and the matte read from luma alone where it differs from the background's by this
LUMA_CONTRAST = 25.0


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


def refine_still(items: list, n_spots: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Joint matte over all spots from their aligned on / off crops (still camera)."""
    pairs = []
    for si in range(n_spots):
        on = [(y, uv) for s, y, uv, o in items if s == si and o]
        off = [(y, uv) for s, y, uv, o in items if s == si and not o]
        if not on or not off:
            continue

        def median(frames: list) -> torch.Tensor:
            y = np.stack([f[0] for f in frames])[:, None]
            uv = upsample_uv(np.stack([f[1] for f in frames]))
            return median0(torch.from_numpy(np.concatenate([y, uv], 1)).float())

        pairs.append((median(on), median(off)))
    if not pairs:
        return None
    a, w = blend_fit(pairs)
    a, w = refit_on_core(pairs, a, w)
    ring = border_mask(a.shape[0], a.shape[1], 3, a.device)
    noise = float(a[ring].std())
    a = torch.where(a > max(3 * noise, 0.02), a, torch.zeros_like(a))
    return a, w


def refit_on_core(
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


def inversion_beats_fill(region: Region, items: list) -> bool:
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


def refine_moving(
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
