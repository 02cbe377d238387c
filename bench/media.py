"""Speed and memory of `video.remove_overlay` against a naive loop, side by side.

    python -m bench.media                 # 720p + 1080p fps, RSS of a 2-minute 720p clip
    python -m bench.media --frames 120    # shorter clips
    python -m bench.media --no-report     # do not append to bench/report.md

For each size, one clip with a static semi-transparent logo is generated
(a short loop of synthetic frames, encoded with libx264 ultrafast so generation
stays quick), then timed end to end:

- spool: the `video.remove_overlay` handler (template mode, default hybrid,
  H.264 veryfast crf 20 out), both passes included;
- naive: one thread, decode → RGB → `cv2.inpaint` (Telea, radius 3) of the
  mark's region on the frame → encode with the same encoder settings.

Peak RSS (VmHWM) is measured in fresh subprocesses running the handler on a 2-minute
720p clip and on a 30-second one (flat memory: both about the same).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from worker.media import synth

REPORT = Path(__file__).with_name("report.md")
FPS = 24
LOOP = 48
OPACITY = 0.5


def make_clip(path: Path, frames: int, height: int, width: int) -> tuple[Path, Path, tuple]:
    """A clip with a static logo (bottom right); returns (video, template png, (y, x, h, w))."""
    logo_h = max(24, height // 12)
    logo = synth.make_logo(logo_h, logo_h * 3)
    lh, lw = logo.size
    pos = (height - lh - height // 20, width - lw - width // 30)
    loop = [synth.blend(f, logo, pos, OPACITY) for f in synth.clean_frames(LOOP, height, width)]
    synth.write_video(path, (loop[i % LOOP] for i in range(frames)), fps=FPS, preset="ultrafast")
    return path, logo.save_png(path.with_suffix(".png")), (*pos, lh, lw)


def run_spool(video: Path, template: Path, workdir: Path) -> dict:
    """Run the handler in this process; frames/s over the whole job."""
    from worker.handlers.video_remove_overlay import RemoveOverlay
    from worker.testing import run_handler

    handler = RemoveOverlay()
    handler.setup("cpu")  # imports torch: a once-per-worker cost, not a per-job one
    t0 = time.perf_counter()
    res = run_handler(handler, {}, inputs=[video, template], workdir=workdir)
    wall = time.perf_counter() - t0
    if res.error is not None:
        raise RuntimeError(f"{res.error.message}\n{res.traceback}")
    report = json.loads(res.outputs["report.json"].read_text())
    return {"fps": res.result["frames"] / wall, "wall_s": wall, "stages": report["stages"]}


def run_naive(video: Path, out: Path, box: tuple) -> dict:
    """decode → cv2.inpaint on the frame → encode, in one thread."""
    y, x, h, w = box
    t0 = time.perf_counter()
    n = 0
    with av.open(str(video)) as src, av.open(str(out), "w") as dst:
        vin = src.streams.video[0]
        vs = dst.add_stream("libx264", rate=Fraction(FPS))
        vs.width, vs.height, vs.pix_fmt = vin.width, vin.height, "yuv420p"
        vs.options = {"crf": "20", "preset": "veryfast"}
        mask = np.zeros((vin.height, vin.width), np.uint8)
        mask[y : y + h, x : x + w] = 255
        for frame in src.decode(vin):
            rgb = frame.to_ndarray(format="rgb24")
            fixed = cv2.inpaint(rgb, mask, 3, cv2.INPAINT_TELEA)
            vf = av.VideoFrame.from_ndarray(fixed, format="rgb24")
            vf.pts = n
            for p in vs.encode(vf):
                dst.mux(p)
            n += 1
        for p in vs.encode():
            dst.mux(p)
    wall = time.perf_counter() - t0
    return {"fps": n / wall, "wall_s": wall}


_RSS_CHILD = """
import json, re, sys, time
from worker.handlers.video_remove_overlay import RemoveOverlay
from worker.testing import run_handler
def hwm_mb():
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child would report
    # its parent's peak whenever that was higher.
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024
t0 = time.perf_counter()
res = run_handler(RemoveOverlay(), {}, inputs=sys.argv[1:3], workdir=sys.argv[3])
assert res.error is None, res.traceback
print(json.dumps({"peak_rss_mb": hwm_mb(),
                  "frames": res.result["frames"], "wall_s": time.perf_counter() - t0}))
"""


def peak_rss(video: Path, template: Path, workdir: Path) -> dict:
    """Peak RSS (MB) of a fresh process running the handler on `video`."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(video), str(template), str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Measure, print, and append the figures to bench/report.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=240, help="frames per speed clip")
    ap.add_argument("--rss-seconds", type=int, default=120, help="length of the RSS clip")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    lines = [
        "| clip | frames | spool fps | naive fps | ratio | spool stages (fps) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="spool-bench-media-") as tmp:
        tmpd = Path(tmp)
        for name, (h, w) in (("720p", (720, 1280)), ("1080p", (1080, 1920))):
            t0 = time.perf_counter()
            video, png, box = make_clip(tmpd / f"{name}.mp4", args.frames, h, w)
            gen_s = time.perf_counter() - t0
            naive = run_naive(video, tmpd / f"{name}-naive.mp4", box)
            spool = run_spool(video, png, tmpd / f"{name}-spool")
            st = spool["stages"]
            stage_txt = (
                f"analyse {st['analyse']['end_to_end_fps']}, restore "
                f"{st['restore']['end_to_end_fps']} (decode {st['restore']['decode_fps']}, "
                f"compute {st['restore']['compute_fps']}, encode {st['restore']['encode_fps']})"
            )
            lines.append(
                f"| {name} | {args.frames} | {spool['fps']:.1f} | {naive['fps']:.1f} | "
                f"{spool['fps'] / naive['fps']:.2f}x | {stage_txt} |"
            )
            print(lines[-1], f"(clip generated in {gen_s:.1f} s)", flush=True)
        rss_lines = ["| clip | frames | peak RSS MB | wall s |", "|---|---:|---:|---:|"]
        for seconds in (30, args.rss_seconds):
            video, png, _ = make_clip(tmpd / f"rss{seconds}.mp4", seconds * FPS, 720, 1280)
            r = peak_rss(video, png, tmpd / f"rss{seconds}")
            rss_lines.append(
                f"| 720p {seconds} s | {r['frames']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |"
            )
            print(rss_lines[-1], flush=True)
    text = (
        f"\n## Overlay removal speed and memory ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
        f"`python -m bench.media{'' if argv is None else ' ' + ' '.join(argv)}` on this "
        f"machine; spool = `video.remove_overlay` (template, hybrid, both passes), naive = "
        f"one-thread decode → cv2.inpaint → encode, same encoder (libx264 veryfast crf 20).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(rss_lines)
        + "\n"
    )
    print(text)
    if not args.no_report:
        with REPORT.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
