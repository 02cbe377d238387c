"""Speed and memory of `video.remove_overlay` against a naive loop, side by side.

    python -m bench.media                 # 720p + 1080p fps, RSS of a 2-minute 720p clip
    python -m bench.media --frames 120    # shorter clips
    python -m bench.media --reps 5        # more alternating runs of each side (default 3)
    python -m bench.media --no-report     # do not append to bench/report.md
    python -m bench.media --auto          # auto mode (no template) on a jumping mark, 720p

For each size, one clip with a static semi-transparent logo is generated
(a short loop of synthetic frames, encoded with libx264 ultrafast so generation
stays quick), then timed end to end:

- spool: the `video.remove_overlay` handler (template mode, default hybrid,
  H.264 veryfast crf 20 out), everything included (probe, locating, matte,
  restore, encode);
- naive: one thread, decode → RGB → `cv2.inpaint` (Telea, radius 3) of the
  mark's region on the frame → encode with the same encoder settings.

Both encode with PyAV's libx264, `preset=veryfast`, `crf=20`, yuv420p, the
encoder's default threads. The machine is shared and noisy, so the two sides
alternate (naive, spool, naive, spool, ...) `--reps` times on the same clip;
the table gives the median frames/s of each side, the median and range of
the per-pair ratios (each pair ran back to back, so shares the machine's
load of the moment), and CPU ms per frame (all threads of this process,
which noise from other processes barely moves).

Peak RSS (VmHWM) is measured in fresh subprocesses running the handler on a 2-minute
720p clip and on a 30-second one (flat memory: both about the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
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
#: the auto-mode clip's loop (a moving scene; its mark jumps 2-4 times per loop)
AUTO_LOOP = 96
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
    c0, t0 = time.process_time(), time.perf_counter()
    res = run_handler(handler, {}, inputs=[video, template], workdir=workdir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if res.error is not None:
        raise RuntimeError(f"{res.error.message}\n{res.traceback}")
    report = json.loads(res.outputs["report.json"].read_text())
    n = res.result["frames"]
    return {"fps": n / wall, "wall_s": wall, "cpu_ms": 1000 * cpu / n, "stages": report["stages"]}


def make_auto_clip(path: Path, frames: int, height: int, width: int) -> tuple[Path, list]:
    """A moving-camera clip with a mark jumping between 3 spots (scenes "moving-jump3").

    Returns (video, per-frame box (y, x, h, w) or None), for the naive loop.
    """
    from worker.media import scenes

    loop = AUTO_LOOP
    clip = scenes.make_clip("moving-jump3", loop, height, width)
    mark = clip.marks[0]
    lh, lw = mark.logo.size
    boxes = [None if p is None else (*p, lh, lw) for p in mark.positions]
    synth.write_video(
        path, (clip.blended[i % loop] for i in range(frames)), fps=FPS, preset="ultrafast"
    )
    return path, [boxes[i % loop] for i in range(frames)]


def run_spool_auto(video: Path, workdir: Path) -> dict:
    """The handler with no parameter at all (auto mode); frames/s over the whole job."""
    from worker.handlers.video_remove_overlay import RemoveOverlay
    from worker.testing import run_handler

    handler = RemoveOverlay()
    handler.setup("cpu")
    c0, t0 = time.process_time(), time.perf_counter()
    res = run_handler(handler, {}, inputs=[video], workdir=workdir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if res.error is not None:
        raise RuntimeError(f"{res.error.message}\n{res.traceback}")
    report = json.loads(res.outputs["report.json"].read_text())
    n = res.result["frames"]
    spots = sum(len(m["spots"]) for m in report["auto"]["marks"])
    return {
        "fps": n / wall,
        "wall_s": wall,
        "cpu_ms": 1000 * cpu / n,
        "stages": report["stages"],
        "spots": spots,
    }


def run_naive(video: Path, out: Path, box: tuple | list) -> dict:
    """decode → cv2.inpaint on the frame → encode, in one thread.

    `box` is (y, x, h, w), or a list of them (or None) per frame for a moving mark.
    """
    per_frame = isinstance(box, list)
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    with av.open(str(video)) as src, av.open(str(out), "w") as dst:
        vin = src.streams.video[0]
        vs = dst.add_stream("libx264", rate=Fraction(FPS))
        vs.width, vs.height, vs.pix_fmt = vin.width, vin.height, "yuv420p"
        vs.options = {"crf": "20", "preset": "veryfast"}
        mask = np.zeros((vin.height, vin.width), np.uint8)
        if not per_frame:
            y, x, h, w = box
            mask[y : y + h, x : x + w] = 255
        for frame in src.decode(vin):
            rgb = frame.to_ndarray(format="rgb24")
            if per_frame:
                mask[:] = 0
                b = box[n] if n < len(box) else None
                if b is not None:
                    y, x, h, w = b
                    mask[y : y + h, x : x + w] = 255
            fixed = cv2.inpaint(rgb, mask, 3, cv2.INPAINT_TELEA) if mask.any() else rgb
            vf = av.VideoFrame.from_ndarray(fixed, format="rgb24")
            vf.pts = n
            for p in vs.encode(vf):
                dst.mux(p)
            n += 1
        for p in vs.encode():
            dst.mux(p)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"fps": n / wall, "wall_s": wall, "cpu_ms": 1000 * cpu / n}


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
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of each side")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument(
        "--auto", action="store_true", help="auto mode on a jumping mark at 720p (no RSS runs)"
    )
    args = ap.parse_args(argv)
    if args.auto:
        return main_auto(args, argv)
    lines = [
        "| clip | frames | spool fps | naive fps | ratio: median (range) of pairs "
        "| CPU ms/frame spool / naive "
        "| spool stages (fps, last run) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="spool-bench-media-") as tmp:
        tmpd = Path(tmp)
        for name, (h, w) in (("720p", (720, 1280)), ("1080p", (1080, 1920))):
            t0 = time.perf_counter()
            video, png, box = make_clip(tmpd / f"{name}.mp4", args.frames, h, w)
            gen_s = time.perf_counter() - t0
            naives, spools = [], []
            for rep in range(args.reps):
                naives.append(run_naive(video, tmpd / f"{name}-naive.mp4", box))
                spools.append(run_spool(video, png, tmpd / f"{name}-spool{rep}"))
                print(
                    f"  {name} run {rep + 1}: spool {spools[-1]['fps']:.1f} fps, "
                    f"naive {naives[-1]['fps']:.1f} fps",
                    flush=True,
                )
            sp = statistics.median(r["fps"] for r in spools)
            nv = statistics.median(r["fps"] for r in naives)
            pairs = [s["fps"] / n["fps"] for s, n in zip(spools, naives, strict=True)]
            st = spools[-1]["stages"]
            rs = st["restore"]
            an = st["analyse"]
            analyse = (
                f"analyse in the same pass ({an['frames']} frames held, matte {an['matte_s']} s)"
                if an.get("in_restore_pass")
                else f"analyse {an['end_to_end_fps']}"
            )
            stage_txt = (
                f"{analyse}, restore {rs['end_to_end_fps']} (decode {rs['decode_fps']}, "
                f"compute {rs['compute_fps']}, encode {rs['encode_fps']})"
            )
            cpu_s = statistics.median(r["cpu_ms"] for r in spools)
            cpu_n = statistics.median(r["cpu_ms"] for r in naives)
            lines.append(
                f"| {name} | {args.frames} | {sp:.1f} | {nv:.1f} | {statistics.median(pairs):.2f}x "
                f"({min(pairs):.2f}-{max(pairs):.2f}) | {cpu_s:.1f} / {cpu_n:.1f} | {stage_txt} |"
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
    cmd = "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    text = (
        f"\n## Overlay removal speed and memory ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
        f"`python -m bench.media{cmd}` on this "
        f"machine; spool = `video.remove_overlay` (template, hybrid, whole job), naive = "
        f"one-thread decode → cv2.inpaint → encode, same encoder (PyAV libx264 veryfast "
        f"crf 20, default threads); {args.reps} alternating runs of each side.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(rss_lines)
        + "\n"
    )
    print(text)
    if not args.no_report:
        with REPORT.open("a") as f:
            f.write(text)


def main_auto(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Issue 10's speed figure: auto (no template) vs the naive loop with the true boxes."""
    lines = [
        "| clip | frames | spool auto fps | naive fps | ratio: median (range) of pairs "
        "| CPU ms/frame spool / naive | spots found | spool stages (fps, last run) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="spool-bench-auto-") as tmp:
        tmpd = Path(tmp)
        video, boxes = make_auto_clip(tmpd / "720p-auto.mp4", args.frames, 720, 1280)
        naives, spools = [], []
        for rep in range(args.reps):
            naives.append(run_naive(video, tmpd / "naive.mp4", boxes))
            spools.append(run_spool_auto(video, tmpd / f"spool{rep}"))
            print(
                f"  720p auto run {rep + 1}: spool {spools[-1]['fps']:.1f} fps, "
                f"naive {naives[-1]['fps']:.1f} fps",
                flush=True,
            )
        pairs = [s["fps"] / n["fps"] for s, n in zip(spools, naives, strict=True)]
        st = spools[-1]["stages"]
        stage_txt = ", ".join(f"{k} {v.get('end_to_end_fps')}" for k, v in st.items())
        lines.append(
            f"| 720p moving-jump3 | {args.frames} "
            f"| {statistics.median(r['fps'] for r in spools):.1f} "
            f"| {statistics.median(r['fps'] for r in naives):.1f} "
            f"| {statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f}) "
            f"| {statistics.median(r['cpu_ms'] for r in spools):.1f} / "
            f"{statistics.median(r['cpu_ms'] for r in naives):.1f} "
            f"| {spools[-1]['spots']} of 3 | {stage_txt} |"
        )
    cmd = "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    text = (
        f"\n## Overlay removal speed, auto mode ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
        f"`python -m bench.media{cmd}`; spool = `video.remove_overlay` with no parameter "
        f"(detect, analyse, restore: three decodes), naive = one-thread decode → cv2.inpaint "
        f"of the true box → encode (same encoder); {args.reps} alternating runs.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    if not args.no_report:
        with REPORT.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
