"""Issue 10's evaluation: every case of `worker/media/scenes.py` through every method.

The measuring half of `python -m bench.quality` (its moving-mark table), in
the package so tests/media assert on the same numbers. Methods:

- `none`: the input as it is;
- `auto`: `video.remove_overlay` with no parameter at all (what a user runs);
- `template`: the handler given each mark's true RGBA template (a clip with
  two marks runs it once per mark, the second on the first's output);
- `cv2.inpaint`: OpenCV Telea (radius 3) on the *true* mark mask, frame by
  frame: the naive decode -> inpaint -> encode loop with perfect detection;
- `re-encode`: the input decoded and encoded again with the handler's
  encoder settings: what a clean clip must stay within 0.5 dB of;
- `ceiling` (asked for by name): the *clean* clip through the same chain
  (input codec, decode, the handler's encoder), scored like the others:
  what no method can be expected to beat from that input.

Protocols: `h264` (input libx264 crf 18, output crf 20: the codec's losses on
both sides included) and `lossless` (input FFV1, output libx264 crf 0; the
only loss is yuv420p's chroma). Scores, against the clean RGB frames:

- `psnr_mark`, `ssim_mark`: over the mark's pixels (true alpha > 0) of the
  frames that hold one;
- `psnr`, `ssim`: whole frames (PSNR of the clip's pooled MSE, SSIM the mean
  of per-frame luma SSIM), comparable with video-inpainting papers;
- `flicker`: mean |(O_t - O_t-1) - (C_t - C_t-1)| over pixels marked in both
  frames: the temporal error the method adds (a warp error with the ground
  truth's own motion, no estimated flow needed); lower is better;
- `precision`, `recall` (auto only): of mark pixels per frame, the mark's
  shape > 0.1 where report.json's runs and masks put it, against the true
  shape > 0.1.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from worker.media import io as vio
from worker.media import scenes, synth
from worker.media.auto import mask_from_rle
from worker.media.quality import _gray, _ssim_map, decode

PROTOCOLS = {"h264": (18, 20), "lossless": (None, 0)}
METHODS = ("none", "auto", "template", "cv2.inpaint", "re-encode")
#: a pixel belongs to the mark where its shape (alpha before opacity) exceeds this
SHAPE_LEVEL = 0.1


def write_input(clip: scenes.Clip, path: Path, protocol: str) -> Path:
    """The marked clip as the handler's input: H.264 crf 18, or lossless FFV1."""
    crf_in, _ = PROTOCOLS[protocol]
    if crf_in is None:
        return synth.write_video(path.with_suffix(".mkv"), clip.blended, codec="ffv1")
    return synth.write_video(path, clip.blended, crf=crf_in)


def reencode(src: Path, dst: Path, crf: int) -> Path:
    """Decode and encode again with the handler's encoder (libx264 veryfast), frames as decoded."""
    info = vio.probe(src)
    w = vio.VideoWriter(
        dst,
        width=info.width,
        height=info.height,
        fps=info.fps,
        time_base=info.time_base,
        crf=crf,
        preset="veryfast",
    )
    ok = False
    try:
        for kind, frame in vio.demux(src, want_audio=False):
            if kind == "video":
                w.write(frame)
        ok = True
    finally:
        w.close(flush=ok)
    return dst


def _truth_shapes(clip: scenes.Clip) -> list[np.ndarray]:
    """Per frame, the true mark pixels (any mark's shape > SHAPE_LEVEL)."""
    h, w = clip.clean[0].shape[:2]
    out = []
    for t in range(len(clip.clean)):
        m = np.zeros((h, w), bool)
        for mk in clip.marks:
            m |= synth.alpha_mask(h, w, mk.logo, mk.positions[t], 1.0) > SHAPE_LEVEL
        out.append(m)
    return out


def score(frames: list[np.ndarray], clip: scenes.Clip) -> dict[str, float]:
    """Mark-region and whole-frame PSNR / SSIM and flicker of `frames` against the clean clip."""
    se_mark, n_mark, se_all, n_all = 0.0, 0, 0.0, 0
    ssim_mark, ssim_all, flicker = [], [], []
    prev = None
    for out, ref, alpha in zip(frames, clip.clean, clip.alphas, strict=True):
        region = alpha > 0
        diff = out.astype(np.float64) - ref
        sq = diff**2
        se_all += float(sq.sum())
        n_all += sq.size
        smap = _ssim_map(_gray(out), _gray(ref))
        ssim_all.append(float(smap.mean()))
        if region.any():
            se_mark += float(sq[region].sum())
            n_mark += int(region.sum()) * 3
            ssim_mark.append(float(smap[region].mean()))
        if prev is not None:
            both = region & prev[2]
            if both.any():
                d = (out.astype(np.float64) - prev[0]) - (ref.astype(np.float64) - prev[1])
                flicker.append(float(np.abs(d[both]).mean()))
        prev = (out, ref, region)

    def psnr(se: float, n: int) -> float:
        return round(10 * np.log10(255**2 / max(se / max(n, 1), 1e-10)), 2)

    row = {"psnr": psnr(se_all, n_all), "ssim": round(float(np.mean(ssim_all)), 4)}
    if n_mark:
        row |= {
            "psnr_mark": psnr(se_mark, n_mark),
            "ssim_mark": round(float(np.mean(ssim_mark)), 4),
            "flicker": round(float(np.mean(flicker)) if flicker else 0.0, 3),
        }
    return row


def detection(report: dict[str, Any], clip: scenes.Clip) -> dict[str, float]:
    """Precision and recall of mark pixels from report.json's auto runs and masks."""
    h, w = clip.clean[0].shape[:2]
    n = len(clip.clean)
    pred = [np.zeros((h, w), bool) for _ in range(n)]
    for mark in report.get("auto", {}).get("marks", []):
        mask = mask_from_rle(mark["mask"])
        mh, mw = mask.shape
        for run in mark["runs"]:
            y, x = run["box"]["y"], run["box"]["x"]
            sub = mask[: h - y, : w - x]
            for t in range(run["start_frame"], min(run["end_frame"] + 1, n)):
                pred[t][y : y + mh, x : x + mw] |= sub
    truth = _truth_shapes(clip)
    tp = sum(int((p & t).sum()) for p, t in zip(pred, truth, strict=True))
    npred = sum(int(p.sum()) for p in pred)
    ntrue = sum(int(t.sum()) for t in truth)
    return {
        "precision": round(tp / npred, 4) if npred else (1.0 if ntrue == 0 else 0.0),
        "recall": round(tp / ntrue, 4) if ntrue else 1.0,
        "mark_pixels": ntrue,
        "found_pixels": npred,
    }


def _handler(params: dict, inputs: list[Path], workdir: Path):
    from worker.handlers.video_remove_overlay import RemoveOverlay
    from worker.testing import run_handler

    res = run_handler(RemoveOverlay(), params, inputs=inputs, workdir=workdir)
    if res.error is not None:
        raise RuntimeError(f"{params}: {res.error.message}\n{res.traceback}")
    return res


def baseline_inpaint(frames: list[np.ndarray], clip: scenes.Clip) -> list[np.ndarray]:
    """cv2.inpaint (Telea, radius 3) of the true mark region (alpha > 0), frame by frame."""
    out = []
    for f, alpha in zip(frames, clip.alphas, strict=True):
        mask = (alpha > 0).astype(np.uint8) * 255
        out.append(cv2.inpaint(f, mask, 3, cv2.INPAINT_TELEA) if mask.any() else f.copy())
    return out


def evaluate_case(
    clip: scenes.Clip, workdir: Path, protocol: str = "h264", methods=METHODS
) -> dict[str, dict[str, Any]]:
    """Scores per method for one rendered case under one protocol."""
    workdir.mkdir(parents=True, exist_ok=True)
    _, crf_out = PROTOCOLS[protocol]
    src = write_input(clip, workdir / f"{clip.name}.mp4", protocol)
    decoded = decode(src)
    rows: dict[str, dict[str, Any]] = {}
    if "none" in methods:
        rows["none"] = score(decoded, clip)
    if "auto" in methods:
        res = _handler({"crf": crf_out}, [src], workdir / "auto")
        report = json.loads(res.outputs["report.json"].read_text())
        rows["auto"] = score(decode(res.outputs["clean.mp4"]), clip) | detection(report, clip)
        rows["auto"]["report"] = report
    if "template" in methods and clip.marks:
        cur = src
        for i, mk in enumerate(clip.marks):
            png = mk.logo.save_png(workdir / f"logo{i}.png")
            res = _handler({"crf": crf_out}, [cur, png], workdir / f"template{i}")
            cur = res.outputs["clean.mp4"]
        rows["template"] = score(decode(cur), clip)
    if "cv2.inpaint" in methods and clip.marks:
        base = synth.write_video(
            workdir / f"{clip.name}-telea.mp4", baseline_inpaint(decoded, clip), crf=crf_out
        )
        rows["cv2.inpaint"] = score(decode(base), clip)
    if "re-encode" in methods:
        again = reencode(src, workdir / f"{clip.name}-again.mp4", crf_out)
        rows["re-encode"] = score(decode(again), clip)
    if "ceiling" in methods and clip.marked:
        clean = write_input(replace(clip, blended=clip.clean), workdir / "clean.mp4", protocol)
        rows["ceiling"] = score(decode(reencode(clean, workdir / "clean-again.mp4", crf_out)), clip)
    return rows


def frame_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))
