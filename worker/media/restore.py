"""Undo an overlay on a batch of crops: invert the blend, inpaint, or both per pixel.

- `invert`: `I = (J - a*W) / (1 - a)` recovers the real pixels where the mark
  lets enough of them through; noise grows as `1 / (1 - a)`.
- `inpaint`: OpenCV Telea (or Navier-Stokes) fills the mark from its
  surroundings; needed where alpha is near 1.
- `hybrid`: invert where `a <= alpha_lo`, inpaint where `a >= alpha_hi`, a
  linear ramp between, feathered so no seam shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("invert", "inpaint", "hybrid")


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
    #: "ns" (Navier-Stokes, the better of the two on textures) or "telea"
    inpaint_algo: str = "ns"
    #: grow the inpaint mask by this many pixels (covers codec ringing; costs detail)
    mask_dilate: int = 0
    #: gaussian sigma (pixels) of the hybrid weight's feather
    feather: float = 1.0


def invert_blend(crops: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Invert `J = a*W + (1-a)*I` for a batch (B, C, h, w) float; alpha (h, w), colour (C,)."""
    a = alpha[None, None]
    w = colour.view(1, -1, 1, 1)
    return ((crops - a * w) / (1 - a)).clamp(0, 255)


def inpaint_crops(crops: np.ndarray, mask: np.ndarray, radius: int, algo: str) -> np.ndarray:
    """Inpaint each crop (B, h, w, C) uint8 where `mask` (h, w) uint8 is set."""
    flag = cv2.INPAINT_NS if algo == "ns" else cv2.INPAINT_TELEA
    out = np.empty_like(crops)
    channels = crops.shape[3]
    for i, crop in enumerate(crops):
        if channels in (1, 3):
            res = cv2.inpaint(np.ascontiguousarray(crop), mask, radius, flag)
            out[i] = res.reshape(crop.shape)
        else:
            for c in range(channels):
                plane = np.ascontiguousarray(crop[:, :, c])
                out[i, :, :, c] = cv2.inpaint(plane, mask, radius, flag)
    return out


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
    host = crops.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    inp = torch.from_numpy(inpaint_crops(host, m, opts.inpaint_radius, opts.inpaint_algo))
    inp = inp.to(crops.device).permute(0, 3, 1, 2).float()
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


def restore_crops(
    crops: torch.Tensor,
    alpha: torch.Tensor,
    colour: torch.Tensor,
    opts: RestoreOptions,
    noise: NoiseModel | None = None,
) -> torch.Tensor:
    """Restore a batch of crops (B, C, h, w) uint8 on the device; returns uint8 on the device."""
    method = opts.method
    j = crops.float()
    if method == "inpaint":
        weight = torch.zeros_like(alpha)
        inverted = j
    else:
        inverted = invert_blend(j, alpha, colour)
        weight = hybrid_weight(alpha, opts, noise) if method == "hybrid" else torch.ones_like(alpha)
    # Inpaint the mark itself (never the feathered ring around it: a larger mask
    # throws away known pixels and blurs the fill).
    need_inpaint = alpha > opts.mask_threshold
    if method != "inpaint":
        need_inpaint &= weight < 0.999
    if not bool(need_inpaint.any()):
        return inverted.round().to(torch.uint8)
    mask = need_inpaint.to(torch.uint8).cpu().numpy() * 255
    if opts.mask_dilate > 0:
        mask = _dilate(mask, opts.mask_dilate)
    host = crops.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    filled = torch.from_numpy(inpaint_crops(host, mask, opts.inpaint_radius, opts.inpaint_algo))
    filled = filled.to(crops.device).permute(0, 3, 1, 2).float()
    if method == "inpaint":
        return filled.round().to(torch.uint8)
    wt = weight[None, None]
    return (wt * inverted + (1 - wt) * filled).round().clamp(0, 255).to(torch.uint8)
