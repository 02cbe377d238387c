"""Linear fills of a fixed mask: harmonic and biharmonic inpainting, solved once per mask.

A mark keeps its shape for the whole video, so the pixels to fill are the
same in every crop. Harmonic (`Δu = 0`, smooth membrane) and biharmonic
(`Δ²u = 0`, thin plate: it carries gradients across the hole, which is what
fills thick strokes over smooth content) fills are linear in the known
pixels: the system matrix of each connected part of the mask is factored
once, and every batch is then a scatter of its known neighbours and one
pair of triangular solves with all crops and channels as right-hand sides,
on the device, without a round trip through OpenCV. Factorizations are kept
per job in a `FillCache` (the same mask serves the fill's selection, the
noise calibration and every batch).

Parts larger than `MAX_PART_PIXELS` are not factored (the dense factorization
grows as n³): they are left in `LinearFill.rest` for the caller to fill with
OpenCV's inpainting.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

#: a connected part of the mask above this many pixels is not solved densely
MAX_PART_PIXELS = 3000

_HARMONIC = ((0, 0, 4.0), (1, 0, -1.0), (-1, 0, -1.0), (0, 1, -1.0), (0, -1, -1.0))
# The 13-point discrete bilaplacian (the 5-point Laplacian applied twice).
_BIHARMONIC = (
    (0, 0, 20.0),
    *((dy, dx, -8.0) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))),
    *((dy, dx, 2.0) for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1))),
    *((dy, dx, 1.0) for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2))),
)
STENCILS = {"harmonic": _HARMONIC, "biharmonic": _BIHARMONIC}


class _Part:
    """One connected part: its unknown pixels, factors and known neighbours."""

    def __init__(self, ys: np.ndarray, xs: np.ndarray, h: int, w: int, stencil) -> None:
        n = len(ys)
        index = np.full((h, w), -1, np.int64)
        index[ys, xs] = np.arange(n)
        a = np.zeros((n, n), np.float32)
        rows, cols, coefs = [], [], []
        for dy, dx, c in stencil:
            yy = np.clip(ys + dy, 0, h - 1)  # replicate at the crop's border
            xx = np.clip(xs + dx, 0, w - 1)
            j = index[yy, xx]
            inside = j >= 0
            np.add.at(a, (np.nonzero(inside)[0], j[inside]), c)
            out = ~inside
            rows.append(np.nonzero(out)[0])
            cols.append(yy[out] * w + xx[out])
            coefs.append(np.full(int(out.sum()), -c, np.float32))
        self.unknown = torch.from_numpy(ys * w + xs)
        self.rows = torch.from_numpy(np.concatenate(rows))
        self.cols = torch.from_numpy(np.concatenate(cols))
        self.coefs = torch.from_numpy(np.concatenate(coefs))
        # float32 is plenty: against float64 the fills differ by < 0.01 grey level.
        # Factors, not an explicit inverse: less work to build, and a batch's
        # triangular solves cost less than a product with the dense inverse map.
        # Both stencils restricted to the unknowns are symmetric positive definite
        # (the bilaplacian's is a Gram matrix of the Laplacian's columns), so
        # Cholesky, half the work of LU; LU only if the crop's border broke that.
        self.n = n
        system = torch.from_numpy(a)
        chol, info = torch.linalg.cholesky_ex(system)
        self.chol: tuple[torch.Tensor, torch.Tensor] | None = None
        if int(info) == 0:
            # L and a contiguous L^T: two triangular solves with them are faster
            # than cholesky_solve (and than lu_solve) for a batch of columns.
            self.chol = (chol, chol.mT.contiguous())
        else:
            self.lu, self.pivots = torch.linalg.lu_factor(system)

    def solve(self, flat: torch.Tensor) -> torch.Tensor:
        """Values of the unknowns for images `flat` (h*w, M) float32."""
        dev = flat.device
        rhs = torch.zeros(self.n, flat.shape[1], device=dev)
        rhs.index_add_(0, self.rows.to(dev), self.coefs.to(dev)[:, None] * flat[self.cols.to(dev)])
        if self.chol is not None:
            low, up = (t.to(dev) for t in self.chol)
            y = torch.linalg.solve_triangular(low, rhs, upper=False)
            return torch.linalg.solve_triangular(up, y, upper=True)
        return torch.linalg.lu_solve(self.lu.to(dev), self.pivots.to(dev), rhs)


def small_parts(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """The parts of `mask` (uint8) of at most `max_pixels` (else its smallest part)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask != 0).astype(np.uint8), 8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [i + 1 for i, a in enumerate(areas) if a <= max_pixels] or [int(areas.argmin()) + 1]
    return np.isin(labels, keep).astype(np.uint8) * 255


class LinearFill:
    """A harmonic or biharmonic fill of one fixed mask, factored once."""

    def __init__(self, parts: list[_Part], rest: np.ndarray | None) -> None:
        self.parts = parts
        #: uint8 mask of the parts too large to factor (None: there are none)
        self.rest = rest

    @staticmethod
    def build(mask: np.ndarray, algo: str, cache: FillCache | None = None) -> LinearFill | None:
        """The fill of `mask` (h, w; nonzero = fill), or None when no part is small enough."""
        key = (np.ascontiguousarray(mask != 0).tobytes(), mask.shape, algo)
        if cache is None:
            return _build(*key)
        if key not in cache.fills:
            cache.fills[key] = _build(*key, parts=cache.parts)
        return cache.fills[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Fill (B, C, h, w) float images; returns a new float tensor, unmasked pixels kept."""
        b, c, h, w = images.shape
        flat = images.float().reshape(b * c, h * w).T.contiguous()  # (h*w, M)
        out = flat.clone()
        for part in self.parts:
            out[part.unknown.to(flat.device)] = part.solve(flat)
        return out.T.reshape(b, c, h, w)


class FillCache:
    """Factorizations of one job's masks, by content (one job: no state shared across jobs)."""

    def __init__(self) -> None:
        self.fills: dict[tuple, LinearFill | None] = {}
        #: factored parts by (pixels, crop size, stencil): a part's system depends
        #: on its own pixels only, so the fill's selection (on the mark's small
        #: parts) and the whole mark's fill share the factorizations
        self.parts: dict[tuple, _Part] = {}


def _build(
    mask_bytes: bytes, shape: tuple[int, int], algo: str, parts: dict | None = None
) -> LinearFill | None:
    h, w = shape
    mask = np.frombuffer(mask_bytes, np.bool_).reshape(h, w).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found, big = [], []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] > MAX_PART_PIXELS:
            big.append(i)
            continue
        ys, xs = np.nonzero(labels == i)
        key = ((ys * w + xs).tobytes(), h, w, algo)
        part = parts.get(key) if parts is not None else None
        if part is None:
            part = _Part(ys, xs, h, w, STENCILS[algo])
            if parts is not None:
                parts[key] = part
        found.append(part)
    if not found:
        return None
    rest = np.isin(labels, big).astype(np.uint8) * 255 if big else None
    return LinearFill(found, rest)
