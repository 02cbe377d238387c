"""Flat memory: a clip 10x longer must not need more memory (measured in subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.media import scenes, synth

_CHILD = """
import json, re, sys
from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.testing import run_handler
def hwm_mb():
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child would report
    # its parent's peak whenever that was higher.
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024
inputs = [a for a in sys.argv[1:3] if a != "-"]
res = run_handler(RemoveOverlay(), {}, inputs=inputs, workdir=sys.argv[3])
assert res.error is None, res.traceback
print(json.dumps({"rss_mb": hwm_mb(),
                  "frames": res.result["frames"]}))
"""


def _peak_rss(tmp: Path, frames: int, *, auto: bool = False) -> dict:
    logo = synth.make_logo()
    if auto:
        # a mark jumping between spots over a moving scene, no template given
        clip = scenes.make_clip("moving-jump3", 48, 144, 256)
        loop, n = clip.blended, 48
    else:
        loop = [synth.blend(f, logo, (100, 160), 0.5) for f in synth.clean_frames(24, 144, 256)]
        n = 24
    video = synth.write_video(
        tmp / f"c{frames}.mp4", (loop[i % n] for i in range(frames)), preset="ultrafast"
    )
    png = "-" if auto else str(logo.save_png(tmp / "logo.png"))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(video), png, str(tmp / f"w{frames}")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(run: dict) -> float:
    return run["rss_mb"]


@pytest.mark.parametrize("auto", [False, True], ids=["template", "auto"])
def test_peak_rss_does_not_grow_with_length(tmp_path, auto):
    # auto keeps up to 96 window maps and 96 crops per candidate: past those
    # caps (both reached by 768 frames here) nothing grows with length
    n_short, n_long = (768, 1536) if auto else (48, 480)
    # auto tests its candidates in parallel threads between its passes: whether
    # two large ones overlap moves the peak by ~10-30 MB from run to run at any
    # length, so each length's peak is the lower of two runs
    runs = 2 if auto else 1
    short = min((_peak_rss(tmp_path, n_short, auto=auto) for _ in range(runs)), key=_mb)
    long = min((_peak_rss(tmp_path, n_long, auto=auto) for _ in range(runs)), key=_mb)
    assert short["frames"] == n_short and long["frames"] == n_long
    # 432 more 256x144 frames would be ~48 MB as RGB if anything held them all
    assert long["rss_mb"] - short["rss_mb"] < 20, (short, long)
