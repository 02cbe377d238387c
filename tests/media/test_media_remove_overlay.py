"""`video.remove_overlay` end to end through the handler harness, on small H.264 clips."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.media import synth
from worker.media.quality import decode, score
from worker.sdk import PermanentError
from worker.testing import run_handler


def stream_facts(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return {
            "frames": n,
            "fps": v.average_rate,
            "size": (v.width, v.height),
            "audio": len(c.streams.audio),
        }


def gain_db(clip, out_path: Path) -> float:
    before = score(decode(clip.path), clip.case)["psnr"]
    return score(decode(out_path), clip.case)["psnr"] - before


def test_template_static_keeps_stream_and_removes_mark(static_clip, tmp_path):
    res = run_handler(
        RemoveOverlay(), {}, inputs=[static_clip.path, static_clip.template], workdir=tmp_path
    )
    assert res.error is None, res.traceback
    out = res.outputs["clean.mp4"]
    assert stream_facts(out) == stream_facts(static_clip.path)  # frames, fps, size, audio
    assert gain_db(static_clip, out) >= 15
    report = json.loads(res.outputs["report.json"].read_text())
    assert report["mode"] == "template" and report["frames_with_mark"] == 48
    assert len(report["positions"]) == 1  # one run: the mark never moved
    assert 0.45 < report["marks"][0]["opacity"] < 0.65
    assert report["stages"]["restore"]["end_to_end_fps"] > 0
    stages = {p["stage"] for p in res.progress}
    assert {"analyse", "restore"} <= stages
    assert all(p["unit"] == "frames" for p in res.progress)
    restore = [p["done"] for p in res.progress if p["stage"] == "restore"]
    assert restore == sorted(restore) and restore[-1] == 48


def test_template_follows_a_jumping_mark(jumping_clip, tmp_path):
    res = run_handler(
        RemoveOverlay(), {}, inputs=[jumping_clip.path, jumping_clip.template], workdir=tmp_path
    )
    assert res.error is None, res.traceback
    report = json.loads(res.outputs["report.json"].read_text())
    spots = {(r["y"], r["x"]) for r in report["positions"] if r["found"]}
    assert len(spots) == 3 and report["frames_with_mark"] == 48
    assert stream_facts(res.outputs["clean.mp4"])["frames"] == 48
    assert gain_db(jumping_clip, res.outputs["clean.mp4"]) >= 15


def test_boxes_mode(static_clip, tmp_path):
    (y, x), (h, w) = static_clip.case.positions[0], static_clip.case.logo.size
    box = {"x": x - 2, "y": y - 2, "w": w + 4, "h": h + 4}
    res = run_handler(RemoveOverlay(), {"boxes": [box]}, inputs=[static_clip.path])
    assert res.error is None, res.traceback
    assert json.loads(res.outputs["report.json"].read_text())["mode"] == "boxes"
    assert gain_db(static_clip, res.outputs["clean.mp4"]) >= 15


def test_boxes_time_range_limits_the_work(static_clip):
    (y, x), (h, w) = static_clip.case.positions[0], static_clip.case.logo.size
    box = {"x": x - 2, "y": y - 2, "w": w + 4, "h": h + 4, "start_s": 0.0, "end_s": 1.0}
    res = run_handler(RemoveOverlay(), {"boxes": [box]}, inputs=[static_clip.path])
    assert res.error is None, res.traceback
    assert res.result["crops_restored"] == 24  # 1 s at 24 fps
    out, src = decode(res.outputs["clean.mp4"]), decode(static_clip.path)
    region = static_clip.case.alphas[0] > 0
    clean = static_clip.case.clean
    err = [np.abs(o.astype(float) - c)[region].mean() for o, c in zip(out, clean, strict=True)]
    unchanged = [np.abs(o.astype(float) - s)[region].mean() for o, s in zip(out, src, strict=True)]
    # restored while the box applies (the matte comes from 24 frames only), untouched after
    assert max(err[:24]) < 12 and min(unchanged[24:]) < 6 and min(err[24:]) > 20


def test_auto_mode_finds_a_static_mark(static_clip):
    res = run_handler(RemoveOverlay(), {}, inputs=[static_clip.path])
    assert res.error is None, res.traceback
    report = json.loads(res.outputs["report.json"].read_text())
    assert report["mode"] == "auto" and len(report["detected"]) == 1
    d = report["detected"][0]
    (y, x), (h, w) = static_clip.case.positions[0], static_clip.case.logo.size
    assert d["x"] <= x + 4 and d["y"] <= y + 4
    assert d["x"] + d["w"] >= x + w - 4 and d["y"] + d["h"] >= y + h - 4
    assert gain_db(static_clip, res.outputs["clean.mp4"]) >= 15


@pytest.mark.parametrize("method", ["invert", "inpaint"])
def test_methods_run_end_to_end(static_clip, method):
    res = run_handler(
        RemoveOverlay(), {"method": method}, inputs=[static_clip.path, static_clip.template]
    )
    assert res.error is None, res.traceback
    assert gain_db(static_clip, res.outputs["clean.mp4"]) >= 15


def _expect_permanent(res, code: str, words: str) -> None:
    assert isinstance(res.error, PermanentError), (res.error, res.traceback)
    assert res.error.code == code and words in res.error.message, res.error.message
    assert "clean.mp4" not in res.outputs


def test_not_a_video(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    _expect_permanent(run_handler(RemoveOverlay(), {}, inputs=[bad]), "INVALID_VIDEO", "notes.mp4")


def test_truncated_and_empty_video(static_clip, tmp_path):
    data = static_clip.path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    _expect_permanent(run_handler(RemoveOverlay(), {}, inputs=[cut]), "INVALID_VIDEO", "cut.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _expect_permanent(run_handler(RemoveOverlay(), {}, inputs=[empty]), "INVALID_VIDEO", "empty")


def test_bad_template_and_boxes(static_clip, tmp_path):
    huge = synth.make_logo(200, 600).save_png(tmp_path / "huge.png")
    res = run_handler(RemoveOverlay(), {}, inputs=[static_clip.path, huge])
    _expect_permanent(res, "INVALID_TEMPLATE", "larger than")
    opaque = tmp_path / "opaque.png"
    cv2.imwrite(str(opaque), np.full((20, 40, 3), 200, np.uint8))
    res = run_handler(RemoveOverlay(), {}, inputs=[static_clip.path, opaque])
    _expect_permanent(res, "INVALID_TEMPLATE", "alpha")
    res = run_handler(
        RemoveOverlay(),
        {"boxes": [{"x": 250, "y": 10, "w": 40, "h": 20}]},
        inputs=[static_clip.path],
    )
    _expect_permanent(res, "INVALID_PARAMS", "boxes[0]")
    res = run_handler(RemoveOverlay(), {"mode": "template"}, inputs=[static_clip.path])
    _expect_permanent(res, "INVALID_INPUT", "template")
    res = run_handler(RemoveOverlay(), {"method": "magic"}, inputs=[static_clip.path])
    _expect_permanent(res, "INVALID_PARAMS", "method")


def test_cancel_stops_the_pipeline_promptly(tmp_path):
    logo = synth.make_logo()
    loop = [synth.blend(f, logo, (200, 300), 0.5) for f in synth.clean_frames(24, 288, 512)]
    frames = (loop[i % 24] for i in range(900))
    path = synth.write_video(tmp_path / "long.mp4", frames, preset="ultrafast")
    png = logo.save_png(tmp_path / "logo.png")
    t0 = time.monotonic()
    res = run_handler(RemoveOverlay(), {}, inputs=[path, png], cancel_after_s=0.5)
    assert res.cancelled and res.error is None and res.result is None
    assert time.monotonic() - t0 < 4
    restored = [p["done"] for p in res.progress if p["stage"] == "restore"]
    assert not restored or max(restored) < 900
    assert not [t for t in threading.enumerate() if t.name.startswith("media-") and t.is_alive()]
