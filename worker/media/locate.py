"""Find a template mark in frames by normalized cross-correlation on the device.

A full search runs on a frame downscaled so the template keeps ~16+ pixels on
its short side; the correlation is computed with FFTs and local statistics from
integral images, then the best match is refined at full resolution in a small
window. While the mark stays put, each frame only re-scores the last position
(one dot product); a full search runs every `recheck_every` frames or as soon
as that score drops, which is how jumps between positions are caught.

The pattern is the template's alpha: a mark brightens (or darkens) the frame in
the shape of its alpha whatever the background, so |NCC| with the alpha finds
light and dark marks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: frames `ncc_map` transforms at once (bounds its memory)
NCC_CHUNK = 16


@dataclass(frozen=True)
class Match:
    """Top-left corner (full resolution) and |NCC| score of a match."""

    y: int
    x: int
    score: float


def fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 5: FFTs of such sizes are
    fast (a prime length took twice as long as the next 5-smooth one)."""
    while True:
        k = n
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return n
        n += 1


def ncc_map(frames: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """|NCC| of `pattern` (th, tw) at every valid offset of `frames` (B, H, W), float32.

    At most `NCC_CHUNK` frames are transformed at once: the spectra and window
    sums of a hundred 720p crops held together were ~0.5 GB (each frame's
    result is the same either way).
    """
    if frames.shape[0] > NCC_CHUNK:
        return torch.cat(
            [ncc_map(frames[i : i + NCC_CHUNK], pattern) for i in range(0, len(frames), NCC_CHUNK)]
        )
    _, h, w = frames.shape
    th, tw = pattern.shape
    p = pattern - pattern.mean()
    pnorm = p.norm().clamp_min(1e-6)
    n = th * tw
    # A circular correlation of size >= (h, w) does not wrap at a valid offset
    # (the pattern, zero-padded, never reaches past the frame's last row or
    # column there): no padding by the pattern's size is needed.
    fh, fw = fft_size(h), fft_size(w)
    f_frames = torch.fft.rfft2(frames, s=(fh, fw))
    f_pat = torch.fft.rfft2(p, s=(fh, fw))
    corr = torch.fft.irfft2(f_frames * f_pat.conj(), s=(fh, fw))[:, : h - th + 1, : w - tw + 1]
    s1, s2 = _window_sums(frames, th, tw)
    var = (s2 - s1 * s1 / n).clamp_min(0).float()
    return (corr / (var.sqrt() * pnorm).clamp_min(1e-3)).abs()


def _window_sums(frames: torch.Tensor, th: int, tw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the values and of their squares over every (th, tw) window, float64.

    From integral images (float64: the variance is a difference of large sums);
    on the CPU by OpenCV's `integral2`, ~4x faster than two float64 cumsums.
    """

    def window_sum(t: torch.Tensor) -> torch.Tensor:
        return t[:, th:, tw:] - t[:, :-th, tw:] - t[:, th:, :-tw] + t[:, :-th, :-tw]

    if frames.device.type != "cpu":
        f64 = frames.double()
        ii = F.pad(f64.cumsum(1).cumsum(2), (1, 0, 1, 0))
        ii2 = F.pad((f64 * f64).cumsum(1).cumsum(2), (1, 0, 1, 0))
        return window_sum(ii), window_sum(ii2)
    b, h, w = frames.shape
    s1 = np.empty((b, h - th + 1, w - tw + 1))
    s2 = np.empty_like(s1)
    for i, a in enumerate(frames.float().contiguous().numpy()):
        ii, ii2 = cv2.integral2(a, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
        s1[i] = ii[th:, tw:] - ii[:-th, tw:] - ii[th:, :-tw] + ii[:-th, :-tw]
        s2[i] = ii2[th:, tw:] - ii2[:-th, tw:] - ii2[th:, :-tw] + ii2[:-th, :-tw]
    return torch.from_numpy(s1), torch.from_numpy(s2)


def ncc_at(frame: torch.Tensor, pattern: torch.Tensor, y: int, x: int) -> float:
    """|NCC| of `pattern` at one position of `frame` (H, W)."""
    th, tw = pattern.shape
    patch = frame[y : y + th, x : x + tw].float()
    if patch.shape != pattern.shape:
        return 0.0
    a = patch - patch.mean()
    p = pattern - pattern.mean()
    den = (a.norm() * p.norm()).clamp_min(1e-3)
    return float((a * p).sum().abs() / den)


class Locator:
    """Track a template through a stream of luma frames."""

    def __init__(
        self,
        pattern: torch.Tensor,
        *,
        min_score: float = 0.35,
        recheck_every: int = 30,
        drop_ratio: float = 0.75,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.pattern = pattern.float().to(self.device)
        self.min_score = min_score
        self.recheck_every = recheck_every
        self.drop_ratio = drop_ratio
        th, tw = pattern.shape
        self.factor = max(1, min(th, tw) // 16)
        if self.factor > 1:
            self.small = F.avg_pool2d(self.pattern[None, None], self.factor)[0, 0]
        else:
            self.small = self.pattern
        self._last: Match | None = None
        self._ref = 0.0
        self._since = 0
        self.full_searches = 0

    def search(self, frame: torch.Tensor) -> Match:
        """Full search of one frame (H, W) float: coarse FFT NCC, then a fine window."""
        self.full_searches += 1
        f = self.factor
        th, tw = self.pattern.shape
        small = F.avg_pool2d(frame[None, None], f)[0] if f > 1 else frame[None]
        coarse = ncc_map(small, self.small)[0]
        idx = int(coarse.argmax())
        cy, cx = divmod(idx, coarse.shape[1])
        h, w = frame.shape
        y0, x0 = max(cy * f - 2 * f, 0), max(cx * f - 2 * f, 0)
        y1, x1 = min(cy * f + th + 2 * f, h), min(cx * f + tw + 2 * f, w)
        fine = ncc_map(frame[None, y0:y1, x0:x1], self.pattern)[0]
        idx = int(fine.argmax())
        fy, fx = divmod(idx, fine.shape[1])
        return Match(y=y0 + fy, x=x0 + fx, score=float(fine.max()))

    def locate(self, frame: torch.Tensor) -> Match | None:
        """The mark's position in `frame` (H, W; uint8 or float, any device), or None.

        Only the patch under the last match is converted for the cheap re-check;
        the whole frame goes to the device as float only for a full search.
        """
        last = self._last
        if last is not None and self._since < self.recheck_every:
            th, tw = self.pattern.shape
            patch = frame[last.y : last.y + th, last.x : last.x + tw].to(self.device)
            score = ncc_at(patch, self.pattern, 0, 0)
            if score >= max(self.min_score, self.drop_ratio * self._ref):
                self._since += 1
                return Match(last.y, last.x, score)
        m = self.search(frame.to(self.device).float())
        self._since = 0
        if m.score < self.min_score:
            self._last = None
            return None
        if last is None or (m.y, m.x) != (last.y, last.x):
            self._ref = m.score
        self._last = m
        return m
