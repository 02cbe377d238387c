"""Overlay-removal quality on ground truth: PSNR, SSIM and flicker inside the mark.

The measuring half of `python -m bench.quality` (which prints the table), kept
in the package so tests/media can assert on the same numbers.

A known semi-transparent logo (opacity 0.55) is blended onto a clean synthetic
clip (worker.media.synth), static and jumping between 3 positions. Each method
(`invert`, `inpaint`, `hybrid`, and plain `cv2.inpaint` Telea on the true mark
region as the baseline) is scored against the clean clip on the mark's pixels:

- PSNR (dB) over every marked pixel of every frame,
- SSIM (luma, 7x7 gaussian window) averaged over the marked pixels,
- flicker: mean |(R_t - R_t-1) - (C_t - C_t-1)| over pixels marked in both
  frames: temporal noise the restoration adds (lower is better).

"no codec" runs the method on the blended RGB frames in memory
(worker.media.frames); "h264" runs the real `video.remove_overlay` handler on
an H.264 (crf 18) encode of the blended clip and scores its decoded H.264
output (crf 20), so the codec's losses on both sides are included; there the
baseline's frames get the same crf 20 encode, and "clean clip, codec only"
(the clean clip through both encodes) is the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from worker.media import synth
from worker.media.frames import remove_from_frames
from worker.media.restore import RestoreOptions

METHODS = ("invert", "inpaint", "hybrid")
OPACITY = 0.55


@dataclass
class Case:
    """A clip with a known mark."""

    name: str
    clean: list[np.ndarray]
    blended: list[np.ndarray]
    alphas: list[np.ndarray]
    logo: synth.Logo
    positions: list[tuple[int, int]]


def make_case(kind: str, n: int, height: int, width: int, *, logo_h: int = 24, seed: int = 0):
    """`static` (one spot) or `jumping` (3 spots) mark on a moving synthetic clip."""
    logo = synth.make_logo(logo_h, logo_h * 3)
    clean = list(synth.clean_frames(n, height, width, seed=seed))
    if kind == "static":
        lh, lw = logo.size
        positions = [(height - lh - 10, width - lw - 12)] * n
    else:
        positions = synth.jumping_positions(n, height, width, logo, jumps=3, every=max(4, n // 6))
    blended = [synth.blend(f, logo, p, OPACITY) for f, p in zip(clean, positions, strict=True)]
    alphas = [synth.alpha_mask(height, width, logo, p, OPACITY) for p in positions]
    return Case(kind, clean, blended, alphas, logo, positions)


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (7, 7), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a * mu_a
    sbb = blur(b * b) - mu_b * mu_b
    sab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    return num / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))


def _gray(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32)


def score(frames: list[np.ndarray], case: Case) -> dict[str, float]:
    """PSNR, SSIM and flicker of `frames` against the clean clip, on the mark's pixels."""
    se, count, ssims, flicker = 0.0, 0, [], []
    prev = None
    for out, ref, alpha in zip(frames, case.clean, case.alphas, strict=True):
        region = alpha > 0
        diff = out.astype(np.float64) - ref
        se += float((diff[region] ** 2).sum())
        count += int(region.sum()) * 3
        ssims.append(float(_ssim_map(_gray(out), _gray(ref))[region].mean()))
        if prev is not None:
            both = region & prev[2]
            if both.any():
                d = (out.astype(np.float64) - prev[0]) - (ref.astype(np.float64) - prev[1])
                flicker.append(float(np.abs(d[both]).mean()))
        prev = (out, ref, region)
    mse = se / max(count, 1)
    return {
        "psnr": round(10 * np.log10(255**2 / max(mse, 1e-10)), 2),
        "ssim": round(float(np.mean(ssims)), 4),
        "flicker": round(float(np.mean(flicker)) if flicker else 0.0, 3),
    }


def baseline_inpaint(frames: list[np.ndarray], case: Case) -> list[np.ndarray]:
    """Plain cv2.inpaint (Telea, radius 3) of the true mark region, frame by frame."""
    out = []
    for f, alpha in zip(frames, case.alphas, strict=True):
        mask = (alpha > 0).astype(np.uint8) * 255
        out.append(cv2.inpaint(f, mask, 3, cv2.INPAINT_TELEA))
    return out


def evaluate_no_codec(case: Case) -> dict[str, dict[str, float]]:
    """Scores per method on in-memory frames (template mode, matte estimated from frames)."""
    template = case.logo.shape
    rows = {"none": score(case.blended, case)}
    for method in METHODS:
        opts = RestoreOptions(method=method)
        res = remove_from_frames(case.blended, opts, template_alpha=template)
        rows[method] = score(res.frames, case)
    rows["cv2.inpaint"] = score(baseline_inpaint(case.blended, case), case)
    return rows


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def evaluate_h264(case: Case, workdir: Path) -> dict[str, dict[str, float]]:
    """Scores per method through the real handler on an H.264 input and output."""
    from worker.handlers.video_remove_overlay import RemoveOverlay
    from worker.testing import run_handler

    src = synth.write_video(workdir / f"{case.name}.mp4", case.blended, crf=18)
    png = case.logo.save_png(workdir / "logo.png")
    decoded = decode(src)
    rows = {"none": score(decoded, case)}
    for method in METHODS:
        res = run_handler(
            RemoveOverlay(),
            {"method": method},
            inputs=[src, png],
            workdir=workdir / f"{case.name}-{method}",
        )
        if res.error is not None:
            raise RuntimeError(f"{method}: {res.error.message}\n{res.traceback}")
        rows[method] = score(decode(res.outputs["clean.mp4"]), case)
    # The baseline gets the same output encode as the handler (crf 20): a naive
    # decode -> cv2.inpaint -> encode loop.
    base = synth.write_video(
        workdir / f"{case.name}-baseline.mp4", baseline_inpaint(decoded, case), crf=20
    )
    rows["cv2.inpaint"] = score(decode(base), case)
    # The ceiling: the clean clip through the same two encodes.
    once = synth.write_video(workdir / f"{case.name}-clean.mp4", case.clean, crf=18)
    twice = synth.write_video(workdir / f"{case.name}-clean2.mp4", decode(once), crf=20)
    rows["clean clip, codec only"] = score(decode(twice), case)
    return rows
