"""Flat memory: a clip 10x longer must not need more memory (measured in subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from worker.media import synth

_CHILD = """
import json, re, sys
from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.testing import run_handler
def hwm_mb():
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child would report
    # its parent's peak whenever that was higher.
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024
res = run_handler(RemoveOverlay(), {}, inputs=sys.argv[1:3], workdir=sys.argv[3])
assert res.error is None, res.traceback
print(json.dumps({"rss_mb": hwm_mb(),
                  "frames": res.result["frames"]}))
"""


def _peak_rss(tmp: Path, frames: int) -> dict:
    logo = synth.make_logo()
    loop = [synth.blend(f, logo, (100, 160), 0.5) for f in synth.clean_frames(24, 144, 256)]
    video = synth.write_video(
        tmp / f"c{frames}.mp4", (loop[i % 24] for i in range(frames)), preset="ultrafast"
    )
    png = logo.save_png(tmp / "logo.png")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(video), str(png), str(tmp / f"w{frames}")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_length(tmp_path):
    short = _peak_rss(tmp_path, 48)
    long = _peak_rss(tmp_path, 480)
    assert short["frames"] == 48 and long["frames"] == 480
    # 432 more 256x144 frames would be ~48 MB as RGB if anything held them all
    assert long["rss_mb"] - short["rss_mb"] < 20, (short, long)
