"""`video.transcode` options, audio kept, bad input."""

from __future__ import annotations

import av
import pytest

from worker.handlers.video_transcode import Transcode
from worker.sdk import PermanentError
from worker.testing import run_handler


def facts(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {
            "codec": v.codec_context.name,
            "size": (v.width, v.height),
            "fps": float(v.average_rate),
            "frames": sum(1 for _ in c.decode(video=0)),
            "audio": len(c.streams.audio),
        }


@pytest.mark.parametrize(
    ("params", "expect"),
    [
        ({}, {"codec": "h264", "size": (256, 144), "fps": 24.0, "frames": 48, "audio": 1}),
        ({"width": 128}, {"size": (128, 72), "frames": 48}),
        ({"crop": {"x": 10, "y": 20, "w": 100, "h": 60}}, {"size": (100, 60)}),
        ({"fps": 12}, {"fps": 12.0, "frames": 24, "audio": 1}),
        ({"codec": "libx265", "crf": 30}, {"codec": "hevc", "frames": 48}),
        ({"codec": "libvpx-vp9"}, {"codec": "vp9", "frames": 48}),
        ({"codec": "libsvtav1", "preset": "12", "height": 72}, {"size": (128, 72)}),
        ({"audio": False}, {"audio": 0}),
    ],
)
def test_transcode_options(static_clip, params, expect):
    res = run_handler(Transcode(), params, inputs=[static_clip.path])
    assert res.error is None, res.traceback
    got = facts(res.outputs["out.mp4"])
    assert {k: got[k] for k in expect} == expect
    assert res.progress[-1]["done"] == res.result["frames_out"] == got["frames"]


def test_transcode_rejects_bad_input_and_crop(static_clip, tmp_path):
    bad = tmp_path / "x.mov"
    bad.write_bytes(b"\x00" * 4096)
    res = run_handler(Transcode(), {}, inputs=[bad])
    assert isinstance(res.error, PermanentError) and res.error.code == "INVALID_VIDEO"
    res = run_handler(
        Transcode(), {"crop": {"x": 200, "y": 0, "w": 100, "h": 60}}, inputs=[static_clip.path]
    )
    assert isinstance(res.error, PermanentError) and "crop" in res.error.message
