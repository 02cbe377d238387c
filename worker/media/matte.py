"""Multi-frame estimation of an overlay's alpha matte and colour.

The model is the alpha blend `J_t = (1 - a) * I_t + a * W` with a matte `a`
and colour `W` that every frame shares and a background `I_t` that changes.
In the spirit of Dekel et al. (CVPR 2017), the shared part is pulled out of
many aligned crops:

- the *shape* of the matte comes from the template's alpha when there is one,
  otherwise from the temporal mean minus a smooth background fitted on the
  crop's unmarked border (moving content averages away, the mark stays);
- the *opacity* scale follows from the temporal spread: a pixel under the mark
  varies `(1 - a)` times as much as the background around it, so one scalar is
  fitted by least squares over every pixel and channel;
- the *colour* is then a linear least-squares fit of the temporal mean.

Smooth backgrounds are modelled by a quadratic surface per channel, which is
what makes the fits global (thousands of pixels for a handful of unknowns)
rather than noisy per-pixel guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: alpha never reaches 1: the inversion divides by (1 - a)
MAX_ALPHA = 0.98


@dataclass
class Matte:
    """An estimated mark: alpha (h, w) and colour per channel, both on the device."""

    alpha: torch.Tensor
    colour: torch.Tensor
    opacity: float

    def stats(self) -> dict:
        """JSON-able summary for report.json."""
        a = self.alpha
        nz = a[a > 0.01]
        return {
            "opacity": round(float(self.opacity), 4),
            "alpha_max": round(float(a.max()), 4),
            "alpha_mean_on_mark": round(float(nz.mean()), 4) if nz.numel() else 0.0,
            "mark_pixels": int(nz.numel()),
            "colour": [round(float(c), 2) for c in self.colour],
        }


def _basis(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Quadratic surface basis over the crop, (h*w, 6)."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, device=device),
        torch.linspace(-1, 1, w, device=device),
        indexing="ij",
    )
    x, y = xx.reshape(-1), yy.reshape(-1)
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=1)


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares by normal equations in float64: a few unknowns, many pixels.

    The designs here are a quadratic surface on [-1, 1] plus a matte column, so
    the small Gram matrix is well conditioned in float64 (not in float32).
    """
    a64, b64 = a.double(), b.double()
    gram = a64.T @ a64
    gram += torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * 1e-9
    sol = torch.linalg.solve(gram, a64.T @ b64)
    resid = ((a64 @ sol - b64) ** 2).sum()
    return sol.float(), resid


def border_mask(h: int, w: int, ring: int, device: torch.device) -> torch.Tensor:
    """True on the crop's outer `ring` pixels (assumed free of the mark)."""
    m = torch.zeros(h, w, dtype=torch.bool, device=device)
    ring = max(1, min(ring, h // 3, w // 3))
    m[:ring], m[-ring:], m[:, :ring], m[:, -ring:] = True, True, True, True
    return m


def shape_from_frames(samples: torch.Tensor, ring: int) -> torch.Tensor:
    """Estimate the mark's shape (h, w) in [0, 1] from aligned crops (K, C, h, w), no template."""
    _, c, h, w = samples.shape
    dev = samples.device
    mean = samples.mean(0).reshape(c, -1)
    basis = _basis(h, w, dev)
    free = border_mask(h, w, ring, dev).reshape(-1)
    coef, _ = _lstsq(basis[free], mean[:, free].T)
    diff = mean - (basis @ coef).T  # (C, N): the mark's contribution a * (W - Q)
    # The mark's colour direction: the mean difference over its strongest pixels.
    mag = diff.norm(dim=0)
    strong = mag >= torch.quantile(mag, 0.9)
    direction = diff[:, strong].mean(1)
    direction = direction / direction.norm().clamp_min(1e-6)
    proj = (direction[:, None] * diff).sum(0)
    scale = torch.quantile(proj, 0.995).clamp_min(1e-3)
    shape = (proj / scale).clamp(0, 1).reshape(h, w)
    # Residual texture of the mean leaves faint speckle: drop it.
    noise = proj[free].std() / scale
    shape = torch.where(shape > 2.5 * noise, shape, torch.zeros_like(shape))
    shape[border_mask(h, w, 1, dev)] = 0
    return shape


def fit_opacity(samples: torch.Tensor, shape: torch.Tensor) -> float:
    """The scalar o with alpha = o * shape that best explains the temporal spread."""
    _, c, h, w = samples.shape
    std = samples.std(0).reshape(c, -1).T.double()  # (N, C)
    basis = _basis(h, w, samples.device).double()
    s = shape.reshape(-1, 1).double()
    smax = float(shape.max())
    if smax <= 0:
        return 0.0
    # The design is (1 - o s) * basis: its Gram matrix and right-hand side are
    # polynomials in o, so each cost is a 6x6 solve on sums made once (the
    # same least squares as `_lstsq`, without touching the N pixels again).
    g0, g1, g2 = (basis.T @ (s**k * basis) for k in range(3))
    b0, b1 = basis.T @ std, basis.T @ (s * std)
    bb = float((std * std).sum())
    eye = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device) * 1e-9

    def cost(o: float) -> float:
        gram = g0 - 2 * o * g1 + o * o * g2 + eye
        atb = b0 - o * b1
        sol = torch.linalg.solve(gram, atb)
        return bb - float((sol * atb).sum())

    hi = MAX_ALPHA / smax
    grid = torch.linspace(0, hi, 50).tolist()
    costs = [cost(o) for o in grid]
    i = min(range(len(grid)), key=costs.__getitem__)
    lo_o, hi_o = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    # Golden-section refinement inside the best grid cell.
    g = (5**0.5 - 1) / 2
    a_, b_ = lo_o, hi_o
    for _ in range(30):
        c1, c2 = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
        if cost(c1) < cost(c2):
            b_ = c2
        else:
            a_ = c1
    return (a_ + b_) / 2


def fit_colour(samples: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Colour (C,) of the mark from the temporal mean, given its alpha (h, w)."""
    _, c, h, w = samples.shape
    mean = samples.mean(0).reshape(c, -1).T
    basis = _basis(h, w, samples.device)
    a = alpha.reshape(-1, 1)
    design = torch.cat([(1 - a) * basis, a], dim=1)
    coef, _ = _lstsq(design, mean)
    return coef[-1].clamp(0, 255)


def estimate_matte(
    samples: torch.Tensor,
    *,
    shape: torch.Tensor | None = None,
    ring: int = 4,
    opacity: float | None = None,
) -> Matte:
    """Estimate the matte from aligned crops `samples` (K, C, h, w) float in 0..255.

    `shape` is the template's alpha placed in the crop (or None to estimate it);
    `opacity` skips the spread fit when the caller knows it.
    """
    samples = samples.float()
    if shape is None:
        shape = shape_from_frames(samples, ring)
    shape = shape.to(samples.device).float()
    if opacity is None:
        opacity = fit_opacity(samples, shape) if samples.shape[0] >= 3 else 0.5
    alpha = (opacity * shape).clamp(0, MAX_ALPHA)
    colour = fit_colour(samples, alpha)
    return Matte(alpha=alpha, colour=colour, opacity=opacity)


def downsample_alpha(alpha: torch.Tensor, factor: int) -> torch.Tensor:
    """Alpha for a subsampled plane (chroma of yuv420p): the mean over each block."""
    if factor == 1:
        return alpha
    return F.avg_pool2d(alpha[None, None], factor)[0, 0]
