"""Issue 10: `auto` finds marks that jump, come and go, with no template; clean clips untouched.

Small versions of the bench targets (bench/quality.py): 48 frames of 320x180
from worker/media/scenes.py, through the real handler with H.264 in and out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.media import evaluate, scenes, synth
from worker.media.auto import _mask_rle, mask_from_rle
from worker.media.quality import decode
from worker.testing import run_handler

N, H, W = 48, 180, 320


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each case evaluated once (auto, template, cv2.inpaint, re-encode, none)."""
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            clip = scenes.make_clip(name, N, H, W)
            cache[name] = (clip, evaluate.evaluate_case(clip, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get  # type: ignore[return-value]


def _spots(clip: scenes.Clip, mark: int = 0) -> set[tuple[int, int]]:
    return {p for p in clip.marks[mark].positions if p is not None}


def _found_spots(report: dict) -> list[tuple[int, int]]:
    return [(s["y"], s["x"]) for m in report["auto"]["marks"] for s in m["spots"]]


def _near(a: tuple[int, int], b: tuple[int, int], px: int = 3) -> bool:
    return abs(a[0] - b[0]) <= px and abs(a[1] - b[1]) <= px


@pytest.mark.parametrize(
    ("name", "vs_template_db"),
    # still camera through H.264: 1.0 dB below template mode measured (27.3 vs 28.4;
    # 1.0 dB above it without the codec), hence the wider margin there
    [("moving-jump3", 1.0), ("still-jump4", 1.5)],
)
def test_jumping_mark_found_at_every_spot_and_removed(results, name, vs_template_db):
    clip, rows = results(name)
    auto, template = rows["auto"], rows["template"]
    report = auto["report"]
    found = _found_spots(report)
    # every spot the mark visits is found (none invented), as one mark
    assert all(any(_near(f, s) for f in found) for s in _spots(clip)), (found, _spots(clip))
    assert len(found) == len(_spots(clip)) and len(report["auto"]["marks"]) == 1, report["auto"]
    assert auto["recall"] >= 0.95 and auto["precision"] >= 0.9, auto
    # as good as being given the template, far better than nothing or a blind fill
    assert auto["psnr_mark"] >= template["psnr_mark"] - vs_template_db, rows
    assert auto["psnr_mark"] >= rows["none"]["psnr_mark"] + 12, rows
    assert auto["psnr_mark"] >= rows["cv2.inpaint"]["psnr_mark"] + 1.0, rows
    # runs: frames, box, score; every frame with the mark is in exactly one run
    runs = report["auto"]["marks"][0]["runs"]
    assert all({"start_frame", "end_frame", "box", "min_score"} <= set(r) for r in runs)
    covered = sorted(t for r in runs for t in range(r["start_frame"], r["end_frame"] + 1))
    assert covered == list(range(N)), runs


def test_mark_that_appears_late_and_vanishes(results):
    clip, rows = results("still-late-colour")
    auto = rows["auto"]
    runs = auto["report"]["auto"]["marks"][0]["runs"]
    on = [t for t, p in enumerate(clip.marks[0].positions) if p is not None]
    assert len(runs) == 1, runs
    assert abs(runs[0]["start_frame"] - on[0]) <= 1 and abs(runs[0]["end_frame"] - on[-1]) <= 1
    assert auto["recall"] >= 0.95 and auto["precision"] >= 0.85, auto
    assert auto["psnr_mark"] >= rows["none"]["psnr_mark"] + 12, rows
    # a coloured mark: its colour is found (yellow: low U in YUV)
    colour_uv = auto["report"]["marks"][0]["colour_uv"]
    assert colour_uv[0] < 90, colour_uv


@pytest.mark.parametrize("name", ["still-clean", "moving-clean", "moving-clean-ui"])
def test_clean_clips_are_left_alone(results, name):
    _, rows = results(name)
    auto = rows["auto"]
    report = auto["report"]
    assert report["auto"]["marks"] == [] and report["crops_restored"] == 0, report["auto"]
    # the same as plainly re-encoding the input with the same encoder settings
    assert abs(auto["psnr"] - rows["re-encode"]["psnr"]) <= 0.5, rows
    # and it says why each candidate was turned down
    assert all(r["reason"] for r in report["auto"]["rejected"])


def test_opaque_static_badge_is_rejected_as_content(results):
    _, rows = results("moving-clean-ui")
    reasons = [r["reason"] for r in rows["auto"]["report"]["auto"]["rejected"]]
    assert any("opaque" in r or "does not move" in r for r in reasons), reasons


def test_mask_rle_round_trip():
    import torch

    rng = np.random.default_rng(3)
    for shape in [(5, 7), (1, 1), (4, 4)]:
        t = torch.from_numpy(rng.random(shape).astype(np.float32))
        assert (mask_from_rle(_mask_rle(t)) == (t > 0.1).numpy()).all()
    assert not mask_from_rle(_mask_rle(torch.zeros(3, 3))).any()
    assert mask_from_rle(_mask_rle(torch.ones(3, 3))).all()


def test_auto_default_through_handler_reports_runs(tmp_path: Path):
    """No parameter at all: what `spool submit video.remove_overlay --input clip.mp4` runs."""
    clip = scenes.make_clip("moving-jump3", N, H, W)
    src = synth.write_video(tmp_path / "clip.mp4", clip.blended, crf=18, audio=True)
    res = run_handler(RemoveOverlay(), {}, inputs=[src], workdir=tmp_path / "w")
    assert res.error is None, res.traceback
    report = json.loads(res.outputs["report.json"].read_text())
    assert report["mode"] == "auto" and report["auto"]["scene"] == "moving"
    assert res.result["marks"] == 1 and res.result["frames_with_mark"] == N
    assert len(decode(res.outputs["clean.mp4"])) == N
    stages = {p["stage"] for p in res.progress}
    assert {"detect", "analyse", "restore", "done"} <= stages


def test_template_grown_past_the_frame_edge_does_not_fail_the_job(tmp_path: Path):
    """Regression: a mark's grown template could reach past the frame's edge at one of its
    spots (here a looped 256x144 clip), which crashed the analysis instead of dropping it."""
    clip = scenes.make_clip("moving-jump3", 48, 144, 256)
    frames = (clip.blended[i % 48] for i in range(240))
    src = synth.write_video(tmp_path / "loop.mp4", frames, preset="ultrafast")
    res = run_handler(RemoveOverlay(), {}, inputs=[src], workdir=tmp_path / "w")
    assert res.error is None, res.traceback
    report = json.loads(res.outputs["report.json"].read_text())
    h, w = 144, 256
    for m in report["auto"]["marks"]:
        mh, mw = m["mask"]["h"], m["mask"]["w"]
        assert all(0 <= s["y"] <= h - mh and 0 <= s["x"] <= w - mw for s in m["spots"]), m
