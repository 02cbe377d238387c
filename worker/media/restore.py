"""Undo an overlay on a batch of crops: invert the blend, inpaint, or both per pixel.

- `invert`: `I = (J - a*W) / (1 - a)` recovers the real pixels where the mark
  lets enough of them through; noise grows as `1 / (1 - a)`.
- `inpaint`: fills the mark from its surroundings; needed where alpha is near
  1. A harmonic or biharmonic fill of the fixed mask (`worker/media/fill.py`),
  by default whichever agrees better with the inversion on the matte samples
  (`choose_fill`), or OpenCV's Navier-Stokes / Telea.
- `hybrid`: invert where `a <= alpha_lo`, inpaint where `a >= alpha_hi`, a
  linear ramp between, feathered so no seam shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media.fill import FillCache, LinearFill, small_parts

METHODS = ("invert", "inpaint", "hybrid")
#: fills: "auto" picks one of LINEAR_FILLS per mark; "ns" / "telea" are OpenCV's
FILLS = ("auto", "biharmonic", "harmonic", "ns", "telea")
LINEAR_FILLS = ("biharmonic", "harmonic")
#: what "auto" chooses from
AUTO_FILLS = ("biharmonic", "harmonic", "ns")
#: "auto" compares the fills on the mark's parts up to this size (cheap to
#: factor: letters, not the ring around them)
SELECT_PART_PIXELS = 1024
#: ... on about this many of the samples (thousands of pixels each: plenty to rank)
SELECT_SAMPLES = 16

#: how many crops `inpaint_crops` fills at once (`inpaint_threads`)
_INPAINT_THREADS: ContextVar[int] = ContextVar("inpaint_threads", default=1)


@contextmanager
def inpaint_threads(n: int) -> Iterator[None]:
    """Let `inpaint_crops` fill up to `n` crops at once within the block.

    OpenCV releases the GIL while it inpaints, so the crops of a batch fill
    in parallel; worth it only when the cores are otherwise idle (auto mode's
    analysis between its passes, when nothing decodes or encodes). Per
    context: a concurrent job in another thread is not affected.
    """
    token = _INPAINT_THREADS.set(max(1, n))
    try:
        yield
    finally:
        _INPAINT_THREADS.reset(token)


@dataclass(frozen=True)
class RestoreOptions:
    """Per-pixel choice between inversion and inpainting."""

    method: str = "hybrid"
    #: hybrid: pure inversion at or below this alpha
    alpha_lo: float = 0.7
    #: hybrid: pure inpainting at or above this alpha
    alpha_hi: float = 0.85
    #: pixels with alpha above this belong to the mark (inpaint mask)
    mask_threshold: float = 0.01
    inpaint_radius: int = 3
    #: one of FILLS: "auto" (per mark, see `choose_fill`), "biharmonic",
    #: "harmonic", or OpenCV's "ns" (Navier-Stokes) / "telea"
    inpaint_algo: str = "auto"
    #: grow the inpaint mask by this many pixels (covers codec ringing; costs detail)
    mask_dilate: int = 0
    #: gaussian sigma (pixels) of the hybrid weight's feather
    feather: float = 1.0
    #: the job's factored fills (set once per job: `with_cache`)
    fills: FillCache | None = field(default=None, compare=False, repr=False)

    def with_cache(self) -> RestoreOptions:
        """These options with a fresh per-job `FillCache`."""
        return replace(self, fills=FillCache())


def invert_blend(crops: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Invert `J = a*W + (1-a)*I` for a batch (B, C, h, w) float; alpha (h, w), colour (C,)."""
    a = alpha[None, None]
    w = colour.view(1, -1, 1, 1)
    return ((crops - a * w) / (1 - a)).clamp(0, 255)


def inpaint_crops(crops: np.ndarray, mask: np.ndarray, radius: int, algo: str) -> np.ndarray:
    """Inpaint each crop (B, h, w, C) uint8 where `mask` (h, w) uint8 is set.

    Only a window around the mask is handed to OpenCV: pixels farther than
    `radius` from the mask never take part, so the result is the same as on
    the whole crop (checked in tests/media) for less work. Two channels (U, V)
    go through one 3-channel call, which shares the fast-marching order.
    """
    flag = cv2.INPAINT_NS if algo == "ns" else cv2.INPAINT_TELEA
    out = crops.copy()
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return out
    m = radius + 2
    h, w = mask.shape
    y0, y1 = max(int(ys.min()) - m, 0), min(int(ys.max()) + m + 1, h)
    x0, x1 = max(int(xs.min()) - m, 0), min(int(xs.max()) + m + 1, w)
    sub_mask = np.ascontiguousarray(mask[y0:y1, x0:x1])
    channels = crops.shape[3]

    def fill(i: int) -> None:
        win = crops[i, y0:y1, x0:x1]
        if channels in (1, 3):
            res = cv2.inpaint(np.ascontiguousarray(win), sub_mask, radius, flag)
            out[i, y0:y1, x0:x1] = res.reshape(win.shape)
        elif channels == 2:
            res = cv2.inpaint(np.ascontiguousarray(win[:, :, [0, 1, 1]]), sub_mask, radius, flag)
            out[i, y0:y1, x0:x1] = res[:, :, :2]
        else:
            for c in range(channels):
                plane = np.ascontiguousarray(win[:, :, c])
                out[i, y0:y1, x0:x1, c] = cv2.inpaint(plane, sub_mask, radius, flag)

    threads = min(_INPAINT_THREADS.get(), len(crops))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, range(len(crops))))
    else:
        for i in range(len(crops)):
            fill(i)
    return out


def fill_crops(crops: torch.Tensor, mask: np.ndarray, opts: RestoreOptions) -> torch.Tensor:
    """Fill `mask` (h, w) uint8 in crops (B, C, h, w) float with `opts.inpaint_algo`.

    Parts of the mask too large for a linear fill, and an unresolved "auto",
    get OpenCV's Navier-Stokes.
    """
    algo = opts.inpaint_algo
    if algo in LINEAR_FILLS:
        fill = LinearFill.build(mask, algo, opts.fills)
        if fill is not None:
            out = fill(crops).clamp(0, 255)
            if fill.rest is None:
                return out
            return _opencv_fill(out, fill.rest, opts.inpaint_radius, "ns")
    return _opencv_fill(crops, mask, opts.inpaint_radius, algo if algo == "telea" else "ns")


def _opencv_fill(crops: torch.Tensor, mask: np.ndarray, radius: int, algo: str) -> torch.Tensor:
    host = crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
    filled = inpaint_crops(host.numpy(), mask, radius, algo)
    return torch.from_numpy(filled).to(crops.device).permute(0, 3, 1, 2).float()


def choose_fill(
    crops: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor, opts: RestoreOptions
) -> RestoreOptions:
    """`opts` with a concrete fill: for "auto", the linear fill that suits this mark best.

    The truth under the mark is unknown, but the inversion of the samples
    (K, C, h, w) is an unbiased estimate of it whose noise does not depend on
    the fill; so the fill with the smallest squared difference to the
    inversion (weighted by (1 - a)^2, the inverse of that noise's growth) is
    the one with the smallest error. Biharmonic wins on smooth content at
    high resolution (it carries gradients across a thick stroke), harmonic
    on fine texture where extrapolated gradients overshoot; Navier-Stokes is
    a candidate too. The comparison runs on the mark's smaller parts only,
    so that just the chosen fill is ever factored for the whole mark.
    """
    if opts.inpaint_algo != "auto":
        return opts
    mark = alpha > opts.mask_threshold
    if int(mark.sum()) < 16:
        return replace(opts, inpaint_algo="harmonic")
    crops = crops[:: max(1, crops.shape[0] // SELECT_SAMPLES)]
    m = small_parts(mark.to(torch.uint8).cpu().numpy() * 255, SELECT_PART_PIXELS)
    mask = torch.from_numpy(m != 0).to(alpha.device)
    inv = invert_blend(crops.float(), alpha, colour)[:, :, mask]
    weight = (1 - alpha[mask]) ** 2
    best, best_err = "ns", float("inf")
    for algo in AUTO_FILLS:
        if algo in LINEAR_FILLS and LinearFill.build(m, algo, opts.fills) is None:
            continue  # too large to factor: it would be Navier-Stokes anyway
        cand = replace(opts, inpaint_algo=algo)
        err = float((((fill_crops(crops.float(), m, cand)[:, :, mask] - inv) ** 2) * weight).mean())
        if err < best_err:
            best, best_err = algo, err
    return replace(opts, inpaint_algo=best)


def _dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.dilate(mask, kernel)


@dataclass(frozen=True)
class NoiseModel:
    """Error variances that decide the hybrid mix per pixel.

    Inverting multiplies the input's noise (codec, sensor) by 1 / (1 - a), so its
    error variance is `invert_var / (1 - a)^2`; inpainting's error grows with the
    distance `d` to the nearest known pixel: `inpaint_var + inpaint_var_per_px * d`.
    Where inversion is expected to be worse, the two are mixed with the weights
    that minimise the expected error; elsewhere inversion is kept as is (its
    variance term is an upper bound, see `calibrate_noise`).
    """

    invert_var: float
    inpaint_var: float
    inpaint_var_per_px: float = 0.0

    def weight(self, alpha: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Weight of the inverted result per pixel, given the distance map of the mask."""
        v_inv = self.invert_var / (1 - alpha).clamp_min(0.02) ** 2
        v_inp = self.inpaint_var + self.inpaint_var_per_px * dist
        mix = v_inp / (v_inp + v_inv).clamp_min(1e-9)
        return torch.where(v_inv <= v_inp, torch.ones_like(mix), mix)


def _distance(mask: np.ndarray) -> np.ndarray:
    """Distance (pixels) from each masked pixel to the nearest unmasked one."""
    return cv2.distanceTransform(mask, cv2.DIST_L2, 3)


def calibrate_noise(
    crops: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor, opts: RestoreOptions
) -> NoiseModel | None:
    """Fit the `NoiseModel` on sample crops (K, C, h, w) uint8 of one mark.

    Both methods run on the samples; their difference has variance
    `invert_var / (1 - a)^2 + inpaint_var + inpaint_var_per_px * d`, which a
    least-squares fit over the marked pixels splits into its terms. Part of the
    inpainting error still correlates with alpha (the middle of a stroke is both
    opaque and far from known pixels), so `invert_var` comes out high: hence the
    conservative use in `NoiseModel.weight`.
    """
    mask = alpha > opts.mask_threshold
    if int(mask.sum()) < 16:
        return None
    inv = invert_blend(crops.float(), alpha, colour)
    m = mask.to(torch.uint8).cpu().numpy() * 255
    inp = fill_crops(crops.float(), m, opts).round()
    diff = (inv - inp)[:, :, mask]  # (K, C, P)
    var = (diff**2).mean(dim=(0, 1)).double().cpu()
    gain = (1 / (1 - alpha[mask]).clamp_min(0.02) ** 2).double().cpu()
    dist = torch.from_numpy(_distance(m)).to(alpha.device)[mask].double().cpu()
    one = torch.ones_like(gain)
    sol = torch.linalg.lstsq(torch.stack([gain, one, dist], 1), var[:, None]).solution[:, 0]
    if float(sol[2]) < 0:
        sol = torch.linalg.lstsq(torch.stack([gain, one], 1), var[:, None]).solution[:, 0]
        sol = torch.cat([sol, torch.zeros(1, dtype=sol.dtype)])
    return NoiseModel(
        invert_var=max(float(sol[0]), 0.05),  # never below uint8 rounding
        inpaint_var=max(float(sol[1]), 0.05),
        inpaint_var_per_px=max(float(sol[2]), 0.0),
    )


def hybrid_weight(
    alpha: torch.Tensor, opts: RestoreOptions, noise: NoiseModel | None = None
) -> torch.Tensor:
    """Weight of the inverted result per pixel (1 = invert, 0 = inpaint), feathered."""
    span = max(opts.alpha_hi - opts.alpha_lo, 1e-3)
    w = ((opts.alpha_hi - alpha) / span).clamp(0, 1)
    if noise is not None:
        on_mark = alpha > opts.mask_threshold
        m = on_mark.to(torch.uint8).cpu().numpy() * 255
        dist = torch.from_numpy(_distance(m)).to(alpha.device)
        w = torch.where(on_mark, torch.minimum(w, noise.weight(alpha, dist)), w)
    if opts.feather > 0 and bool((w < 1).any()):
        k = max(3, int(opts.feather * 3) * 2 + 1)
        x = torch.arange(k, device=alpha.device, dtype=torch.float32) - k // 2
        g = torch.exp(-(x**2) / (2 * opts.feather**2))
        g = g / g.sum()
        soft = F.conv2d(w[None, None], g.view(1, 1, 1, -1), padding=(0, k // 2))
        soft = F.conv2d(soft, g.view(1, 1, -1, 1), padding=(k // 2, 0))[0, 0]
        # Only feather towards inpainting: never let the blur raise a pixel's weight.
        w = torch.minimum(w, soft)
    return w


@dataclass(frozen=True)
class CropPlan:
    """What restoring depends on besides the pixels: fixed per mark placement.

    The weight map needs a distance transform and a blur, and the inpaint mask
    a host copy; a mark keeps its alpha for the whole video, so both are made
    once per placement (`plan_crops`) instead of once per batch.
    """

    #: weight of the inverted result per pixel (h, w) on the device
    weight: torch.Tensor
    #: uint8 (h, w) mask of the pixels to inpaint, None when nothing needs it
    inpaint_mask: np.ndarray | None


def plan_crops(
    alpha: torch.Tensor, opts: RestoreOptions, noise: NoiseModel | None = None
) -> CropPlan:
    """The weight map and inpaint mask for crops under `alpha` (h, w)."""
    method = opts.method
    if method == "inpaint":
        weight = torch.zeros_like(alpha)
    elif method == "hybrid":
        weight = hybrid_weight(alpha, opts, noise)
    else:
        weight = torch.ones_like(alpha)
    # Fill the whole mark from the unmarked pixels around it (never the feathered
    # ring: a larger mask throws away known pixels and blurs the fill), even
    # where only part of it is mixed in: inverted pixels carry the codec's noise
    # times 1 / (1 - a), which a fill would spread, and it is this fill that
    # `calibrate_noise` measured.
    on_mark = alpha > opts.mask_threshold
    needed = on_mark if method == "inpaint" else on_mark & (weight < 0.999)
    if not bool(needed.any()):
        return CropPlan(weight, None)
    mask = on_mark.to(torch.uint8).cpu().numpy() * 255
    if opts.mask_dilate > 0:
        mask = _dilate(mask, opts.mask_dilate)
    return CropPlan(weight, mask)


def restore_crops(
    crops: torch.Tensor,
    alpha: torch.Tensor,
    colour: torch.Tensor,
    opts: RestoreOptions,
    noise: NoiseModel | None = None,
    plan: CropPlan | None = None,
) -> torch.Tensor:
    """Restore a batch of crops (B, C, h, w) uint8 on the device; returns uint8 on the device.

    `plan` (from `plan_crops` with the same alpha, options and noise model)
    saves recomputing the weight map and mask for every batch.
    """
    if plan is None:
        plan = plan_crops(alpha, opts, noise)
    method = opts.method
    j = crops.float()
    inverted = j if method == "inpaint" else invert_blend(j, alpha, colour)
    if plan.inpaint_mask is None:
        return inverted.round().to(torch.uint8)
    filled_t = fill_crops(j, plan.inpaint_mask, opts)
    if method == "inpaint":
        return filled_t.round().to(torch.uint8)
    wt = plan.weight[None, None]
    return (wt * inverted + (1 - wt) * filled_t).round().clamp(0, 255).to(torch.uint8)
