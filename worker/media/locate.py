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

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Match:
    """Top-left corner (full resolution) and |NCC| score of a match."""

    y: int
    x: int
    score: float


def ncc_map(frames: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """|NCC| of `pattern` (th, tw) at every valid offset of `frames` (B, H, W), float32."""
    _, h, w = frames.shape
    th, tw = pattern.shape
    p = pattern - pattern.mean()
    pnorm = p.norm().clamp_min(1e-6)
    n = th * tw
    fh, fw = h + th, w + tw  # zero padding avoids circular wrap-around in the valid region
    f_frames = torch.fft.rfft2(frames, s=(fh, fw))
    f_pat = torch.fft.rfft2(p, s=(fh, fw))
    corr = torch.fft.irfft2(f_frames * f_pat.conj(), s=(fh, fw))[:, : h - th + 1, : w - tw + 1]
    # Local sums over each window from integral images (float64: cancellation).
    f64 = frames.double()
    ii = F.pad(f64.cumsum(1).cumsum(2), (1, 0, 1, 0))
    ii2 = F.pad((f64 * f64).cumsum(1).cumsum(2), (1, 0, 1, 0))

    def window_sum(t: torch.Tensor) -> torch.Tensor:
        return t[:, th:, tw:] - t[:, :-th, tw:] - t[:, th:, :-tw] + t[:, :-th, :-tw]

    s1, s2 = window_sum(ii), window_sum(ii2)
    var = (s2 - s1 * s1 / n).clamp_min(0).float()
    return (corr / (var.sqrt() * pnorm).clamp_min(1e-3)).abs()


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
