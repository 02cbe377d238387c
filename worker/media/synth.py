"""Synthetic clips with a known overlay: the ground truth for quality tests and benchmarks.

`clean_frames()` yields a clean clip (moving sinusoidal textures over a drifting
colour gradient, never flat colour); `make_logo()` draws a semi-transparent mark
(RGBA, anti-aliased); `blend()` composites it exactly as a watermark would be,
`J = a*W + (1-a)*I`; `write_video()` stores frames with PyAV (optionally with an
audio track) so the handlers can be run end to end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Logo:
    """A mark: colour (h, w, 3) uint8 and shape alpha (h, w) float in [0, 1]."""

    rgb: np.ndarray
    shape: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.shape.shape[0], self.shape.shape[1]

    def rgba(self) -> np.ndarray:
        """The template PNG a user would hold: colour plus shape alpha (uint8, RGBA)."""
        alpha = np.round(self.shape * 255).astype(np.uint8)
        return np.dstack([self.rgb, alpha])

    def save_png(self, path: str | Path) -> Path:
        """Write the RGBA template as a PNG and return its path."""
        path = Path(path)
        cv2.imwrite(str(path), cv2.cvtColor(self.rgba(), cv2.COLOR_RGBA2BGRA))
        return path


def make_logo(
    height: int = 24, width: int = 72, text: str = "SPOOL", colour=(240, 240, 235)
) -> Logo:
    """Draw an anti-aliased text-and-ring mark (drawn at 4x, then area-downscaled)."""
    scale = 4
    canvas = np.zeros((height * scale, width * scale), np.uint8)
    thickness = max(2, height * scale // 10)
    font_scale = height * scale / 32.0
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    ring_r = height * scale // 2 - thickness
    x0 = max(2 * ring_r + 2 * thickness, (width * scale - tw) // 2 + ring_r)
    cv2.circle(canvas, (ring_r + thickness, height * scale // 2), ring_r, 255, thickness)
    cv2.putText(
        canvas,
        text,
        (min(x0, width * scale - tw - thickness), (height * scale + th) // 2),
        cv2.FONT_HERSHEY_SIMPLEX,
        font_scale,
        255,
        thickness,
        cv2.LINE_AA,
    )
    hi_res = canvas.astype(np.float32) / 255.0
    shape = cv2.resize(hi_res, (width, height), interpolation=cv2.INTER_AREA)
    shape = np.clip(shape, 0.0, 1.0)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = np.asarray(colour, np.uint8)
    return Logo(rgb=rgb, shape=shape)


def clean_frames(
    n: int, height: int, width: int, *, seed: int = 0, dtype=np.uint8
) -> Iterator[np.ndarray]:
    """Yield `n` clean RGB frames: moving textures over a slowly drifting gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = []
    for _ in range(3):
        period = rng.uniform(14.0, 48.0)
        theta = rng.uniform(0, np.pi)
        speed = rng.uniform(0.6, 2.0)
        amp = rng.uniform(14.0, 26.0, size=3).astype(np.float32)
        kx, ky = np.cos(theta) * 2 * np.pi / period, np.sin(theta) * 2 * np.pi / period
        waves.append((kx, ky, speed * 2 * np.pi / period, amp))
    gx, gy = xx / max(width - 1, 1), yy / max(height - 1, 1)
    for t in range(n):
        base = np.stack(
            [
                70 + 60 * gx + 20 * np.sin(0.05 * t),
                80 + 50 * gy + 15 * np.cos(0.04 * t),
                110 - 40 * gx + 30 * gy,
            ],
            axis=-1,
        )
        for kx, ky, w, amp in waves:
            phase = np.sin(kx * xx + ky * yy - w * t)
            base += phase[..., None] * amp
        yield np.clip(base, 0, 255).round().astype(dtype)


def jumping_positions(
    n: int, height: int, width: int, logo: Logo, *, jumps: int = 3, every: int = 12
) -> list[tuple[int, int]]:
    """Top-left (y, x) of the mark per frame, cycling through `jumps` spots every `every` frames."""
    lh, lw = logo.size
    m = 6
    spots = [
        (m, m),
        (height - lh - m, width - lw - m),
        (m, width - lw - m),
        (height - lh - m, m),
    ][: max(1, jumps)]
    spots = [(y - y % 2, x - x % 2) for y, x in spots]
    return [spots[(t // every) % len(spots)] for t in range(n)]


def blend(frame: np.ndarray, logo: Logo, pos: tuple[int, int] | None, opacity: float) -> np.ndarray:
    """Composite `logo` at `pos` (top-left y, x) with `opacity`: J = a*W + (1-a)*I."""
    if pos is None:
        return frame.copy()
    y, x = pos
    h, w = logo.size
    out = frame.astype(np.float32)
    a = (logo.shape * opacity)[..., None]
    region = out[y : y + h, x : x + w]
    out[y : y + h, x : x + w] = a * logo.rgb.astype(np.float32) + (1 - a) * region
    return np.clip(out, 0, 255).round().astype(np.uint8)


def alpha_mask(
    height: int, width: int, logo: Logo, pos: tuple[int, int] | None, opacity: float = 1.0
) -> np.ndarray:
    """The frame-sized alpha of the mark (float32), zero where it is absent."""
    m = np.zeros((height, width), np.float32)
    if pos is not None:
        y, x = pos
        h, w = logo.size
        m[y : y + h, x : x + w] = logo.shape * opacity
    return m


def _zero_padding(frame):
    """The frame with the bytes past each plane's width (up to its line size) set to 0.

    The converted frame's buffer is not initialised there and libx264 reads
    them (the width 432 has padding, 640 has none): two encodes of the same
    frames with the same settings gave different streams (27 % of decoded
    pixels apart, up to 45 levels), and the benchmark's H.264 rows with them.
    """
    for plane in frame.planes:
        if plane.line_size > plane.width:
            rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
            rows[:, plane.width :] = 0
    return frame


def write_video(
    path: str | Path,
    frames: Sequence[np.ndarray] | Iterator[np.ndarray],
    *,
    fps: int = 24,
    codec: str = "libx264",
    crf: int = 18,
    audio: bool = False,
    preset: str = "veryfast",
) -> Path:
    """Encode RGB frames to `path` (yuv420p, or rgb for lossless ffv1), with an optional tone."""
    import av

    path = Path(path)
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=Fraction(fps))
        vs.width, vs.height = width, height
        if codec == "ffv1":
            vs.pix_fmt = "bgr0"
        else:
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(crf), "preset": preset}
        a_stream = None
        if audio:
            a_stream = out.add_stream("aac", rate=44100)
            a_stream.layout = "mono"
        n = 0

        def put(arr: np.ndarray) -> None:
            nonlocal n
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if codec != "ffv1":
                vf = _zero_padding(vf.reformat(format="yuv420p"))
            vf.pts = n
            vf.time_base = Fraction(1, fps)
            for p in vs.encode(vf):
                out.mux(p)
            n += 1

        put(first)
        for f in frames:
            put(f)
        for p in vs.encode():
            out.mux(p)
        if a_stream is not None:
            sr = 44100
            total = int(sr * n / fps)
            t = np.arange(total) / sr
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            step = 1024
            for i in range(0, total, step):
                chunk = tone[i : i + step][None, :]
                af = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                af.sample_rate = sr
                af.pts = i
                af.time_base = Fraction(1, sr)
                for p in a_stream.encode(af):
                    out.mux(p)
            for p in a_stream.encode():
                out.mux(p)
    return path
