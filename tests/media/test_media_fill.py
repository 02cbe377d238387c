"""The fills and the one-decode template mode: exactness and the fallback."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.media import overlay, synth
from worker.media.fill import LinearFill
from worker.media.quality import decode, score
from worker.media.restore import inpaint_crops
from worker.testing import run_handler


def _mark(h: int = 40, w: int = 96) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.putText(mask, "SP", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 4)
    return mask


@pytest.mark.parametrize("algo", ["ns", "telea"])
def test_opencv_inpaint_on_a_window_equals_the_whole_crop(algo):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 40, 96, 2), dtype=np.uint8)
    crops = np.stack([cv2.GaussianBlur(c, (0, 0), 2) for c in crops])
    mask = _mark()
    flag = cv2.INPAINT_NS if algo == "ns" else cv2.INPAINT_TELEA
    want = np.stack(
        [
            np.dstack(
                [cv2.inpaint(np.ascontiguousarray(c[:, :, k]), mask, 3, flag) for k in (0, 1)]
            )
            for c in crops
        ]
    )
    assert np.array_equal(inpaint_crops(crops, mask, 3, algo), want)


@pytest.mark.parametrize("algo", ["harmonic", "biharmonic"])
def test_linear_fills_keep_known_pixels_and_continue_a_ramp(algo):
    mask = _mark()
    yy, xx = np.mgrid[0:40, 0:96].astype(np.float32)
    ramp = torch.from_numpy(40 + 1.5 * xx + 0.7 * yy)[None, None]
    noisy = ramp.clone()
    noisy[0, 0][torch.from_numpy(mask != 0)] = 255.0  # the mark's pixels are ignored
    fill = LinearFill.build(mask, algo)
    assert fill is not None
    out = fill(noisy)
    # both reproduce linear content exactly; known pixels are untouched
    assert torch.allclose(out, ramp, atol=0.05)
    assert torch.equal(
        out[0, 0][torch.from_numpy(mask == 0)], ramp[0, 0][torch.from_numpy(mask == 0)]
    )


def test_one_pass_falls_back_when_the_prefix_has_no_mark(static_clip, tmp_path, monkeypatch):
    """A mark that appears after the held prefix still gets a matte (full analysis)."""
    case = static_clip.case
    frames = case.clean[:24] + case.blended[24:]
    src = synth.write_video(tmp_path / "late.mp4", frames, crf=18)
    monkeypatch.setattr(overlay, "WARMUP_MAX_FRAMES", 12)
    res = run_handler(RemoveOverlay(), {}, inputs=[src, static_clip.template], workdir=tmp_path)
    assert res.error is None, res.traceback
    report = json.loads(res.outputs["report.json"].read_text())
    assert "wall_s" in report["stages"]["analyse"]  # a whole analyse pass ran
    assert report["frames_with_mark"] == 24
    before = score(decode(src)[24:], _tail(case, 24))["psnr"]
    after = score(decode(res.outputs["clean.mp4"])[24:], _tail(case, 24))["psnr"]
    assert after >= before + 15


def test_one_pass_matches_two_passes(static_clip, tmp_path):
    """Held prefix covering the clip: the one-decode mode gives the same output."""
    one = run_handler(
        RemoveOverlay(), {}, inputs=[static_clip.path, static_clip.template], workdir=tmp_path / "1"
    )
    two = run_handler(
        RemoveOverlay(),
        {"full_analysis": True},
        inputs=[static_clip.path, static_clip.template],
        workdir=tmp_path / "2",
    )
    assert one.error is None and two.error is None
    assert json.loads(one.outputs["report.json"].read_text())["stages"]["analyse"][
        "in_restore_pass"
    ]
    a, b = decode(one.outputs["clean.mp4"]), decode(two.outputs["clean.mp4"])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _tail(case, start: int):
    from dataclasses import replace

    return replace(
        case,
        clean=case.clean[start:],
        blended=case.blended[start:],
        alphas=case.alphas[start:],
        positions=case.positions[start:],
    )


def test_parts_too_large_to_factor_fall_back_to_opencv(monkeypatch):
    from worker.media import fill as fill_mod
    from worker.media.restore import RestoreOptions, fill_crops

    mask = _mark()
    _, _, stats, _ = cv2.connectedComponentsWithStats((mask != 0).astype(np.uint8), 8)
    areas = sorted(stats[1:, cv2.CC_STAT_AREA])
    monkeypatch.setattr(fill_mod, "MAX_PART_PIXELS", int(areas[0]))  # only the smallest fits
    yy, xx = np.mgrid[0:40, 0:96].astype(np.float32)
    ramp = torch.from_numpy(40 + 1.5 * xx + 0.7 * yy)[None, None]
    marked = ramp.clone()
    marked[0, 0][torch.from_numpy(mask != 0)] = 255.0
    built = LinearFill.build(mask, "biharmonic")
    assert built is not None and built.rest is not None and len(built.parts) == 1
    out = fill_crops(marked, mask, RestoreOptions(inpaint_algo="biharmonic"))
    # every masked pixel is filled (OpenCV's fill is close on a ramp, not exact)
    assert float((out - ramp).abs().max()) < 12
    known = torch.from_numpy(mask == 0)
    assert torch.allclose(out[0, 0][known], ramp[0, 0][known], atol=0.5)  # uint8 through OpenCV
