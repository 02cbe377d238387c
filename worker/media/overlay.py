"""Overlay removal over a whole video: analyse (locate + matte), then restore.

Two streaming passes over the file, each on `run_pipeline`:

1. *analyse*: decode, find the mark in every frame (template mode) or take the
   given boxes, and keep a few dozen aligned crops (small, bounded) from frames
   spread over the video; estimate each mark's matte and colour from them.
   `auto` mode runs a detection pass first (median gradients of sampled,
   downscaled frames: a static mark is the structure that does not move).
2. *restore*: decode, restore each mark's crop on the device in batches,
   write the pixels back into the yuv420p frame, encode, remux the audio.

Template mode (`remove_template`) does both in one decode when it can: it
holds a bounded prefix of decoded frames, estimates the matte from samples
spread over it, then restores the prefix and streams the rest; it falls back
to the two passes when the prefix does not show the mark enough.

Only the crops around the mark are converted and computed on; the rest of
the frame goes from decoder to encoder untouched.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from worker.media import io as vio
from worker.media.device import Stager, cpu_threads
from worker.media.locate import Locator
from worker.media.matte import downsample_alpha, estimate_matte, fit_colour
from worker.media.pipeline import StageTimes, run_pipeline
from worker.media.restore import (
    CropPlan,
    NoiseModel,
    RestoreOptions,
    calibrate_noise,
    choose_fill,
    plan_crops,
    restore_crops,
)
from worker.sdk import PermanentError

#: margin (pixels) kept around the mark in every crop: the unmarked ring the
#: background model is fitted on
MARGIN = 6
#: template mode analyses a prefix of the video held in memory (one decode per
#: job): at most this many frames (5 s at 24 fps) and this many bytes of them
#: (all 120 at 720p, 53 at 1080p, 13 at 2160p) ...
WARMUP_MAX_FRAMES = 120
WARMUP_BYTES = 160 * 1024 * 1024
#: ... and at least this many frames, or the job analyses the whole video first
MIN_WARMUP_FRAMES = 8
#: a prefix that yields fewer matte samples than this (the mark is absent or
#: barely there) falls back to analysing the whole video
MIN_WARMUP_SAMPLES = 8
#: torch threads for fitting the matte in the one-pass mode: the encoder has
#: no frame yet and the decoder is blocked on a full queue, so the cores are free
HEAD_THREADS = max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True)
class Box:
    """A region (pixels) that holds the mark between start_s and end_s (None = open)."""

    x: int
    y: int
    w: int
    h: int
    start_s: float = 0.0
    end_s: float | None = None

    def active(self, t: float) -> bool:
        """Whether the box applies at time `t` (seconds)."""
        return t >= self.start_s and (self.end_s is None or t < self.end_s)


@dataclass
class Region:
    """One mark to remove: its crop size and matte."""

    h: int
    w: int
    #: the mark's shape in [0, 1]: template-sized for template marks (placed at
    #: an offset per frame), crop-sized for boxes; None until estimated
    shape: torch.Tensor | None = None
    template: bool = False
    opacity: float = 0.0
    colour_y: torch.Tensor | None = None
    colour_uv: torch.Tensor | None = None
    alpha_stats: dict[str, Any] = field(default_factory=dict)
    #: hybrid mix per plane group (Y, UV), fitted on the samples
    noise_y: NoiseModel | None = None
    noise_uv: NoiseModel | None = None
    #: the options with this mark's fill chosen per plane group (Y, UV)
    opts_y: RestoreOptions | None = None
    opts_uv: RestoreOptions | None = None
    _alphas: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _plans: dict[tuple[int, int], tuple[CropPlan, CropPlan]] = field(default_factory=dict)

    def alphas(self, offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha for Y, alpha for U/V) with a template mark at `offset` inside the crop.

        Free-form marks (boxes) have one placement, offset (0, 0), and their
        shape already spans the crop.
        """
        if offset not in self._alphas:
            assert self.shape is not None
            if self.template:
                th, tw = self.shape.shape
                canvas = torch.zeros(self.h, self.w, device=self.shape.device)
                oy, ox = offset
                canvas[oy : oy + th, ox : ox + tw] = self.shape[: self.h - oy, : self.w - ox]
            else:
                canvas = self.shape
            a = (canvas * self.opacity).clamp(0, 0.98)
            self._alphas[offset] = (a, downsample_alpha(a, 2))
        return self._alphas[offset]

    def plans(self, offset: tuple[int, int], opts: RestoreOptions) -> tuple[CropPlan, CropPlan]:
        """(Y plan, U/V plan) for a placement: weight maps and masks, made once."""
        if offset not in self._plans:
            a_y, a_uv = self.alphas(offset)
            self._plans[offset] = (
                plan_crops(a_y, opts, self.noise_y),
                plan_crops(a_uv, opts, self.noise_uv),
            )
        return self._plans[offset]


@dataclass(frozen=True)
class Placement:
    """Where a region's crop sits in one frame (even top-left) and the mark inside it."""

    region: int
    y0: int
    x0: int
    offset: tuple[int, int] = (0, 0)


def load_template(path: Path, frame_w: int, frame_h: int) -> np.ndarray:
    """The template's alpha (h, w) float in [0, 1] from a PNG with an alpha channel."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PermanentError("template (input 1) is not a readable image", code="INVALID_TEMPLATE")
    if img.ndim != 3 or img.shape[2] != 4:
        raise PermanentError(
            "template (input 1) must be a PNG with an alpha channel", code="INVALID_TEMPLATE"
        )
    alpha = img[:, :, 3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
    ys, xs = np.nonzero(alpha > 0.02)
    if len(ys) == 0:
        raise PermanentError("template (input 1) is fully transparent", code="INVALID_TEMPLATE")
    alpha = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if alpha.shape[0] + 2 > frame_h or alpha.shape[1] + 2 > frame_w:
        raise PermanentError(
            f"template is {alpha.shape[1]}x{alpha.shape[0]}, larger than the "
            f"{frame_w}x{frame_h} frame",
            code="INVALID_TEMPLATE",
        )
    return alpha


def _even_floor(v: int) -> int:
    return v - (v % 2)


def _crop_yuv(views: list[np.ndarray], y0: int, x0: int, h: int, w: int):
    y = views[0][y0 : y0 + h, x0 : x0 + w]
    uv = np.stack([v[y0 // 2 : (y0 + h) // 2, x0 // 2 : (x0 + w) // 2] for v in views[1:]])
    return y, uv


class OverlayRemover:
    """Plans and runs the removal of one mark (template) or several (boxes/auto)."""

    def __init__(
        self,
        path: Path,
        info: vio.VideoInfo,
        *,
        device: torch.device,
        options: RestoreOptions,
        samples: int = 48,
        batch_size: int = 8,
        recheck_every: int = 30,
        min_score: float = 0.35,
        progress: Callable[..., None] | None = None,
        check_cancelled: Callable[[], None] | None = None,
    ) -> None:
        self.path, self.info, self.device = path, info, device
        self.options = options if options.fills is not None else options.with_cache()
        self.samples, self.batch_size = samples, batch_size
        self.recheck_every, self.min_score = recheck_every, min_score
        self._progress = progress or (lambda **kw: None)
        self._check = check_cancelled
        self.stager = Stager(device)
        self.total = info.frames or max(1, round(info.duration_s * float(info.fps)))
        self.regions: list[Region] = []
        self.boxes: list[Box] = []
        self.box_region: list[int] = []
        self.positions: list[tuple[int, int, float] | None] = []
        self.times: dict[str, dict[str, Any]] = {}
        self.template_shape: np.ndarray | None = None
        self.detected: list[dict[str, int]] = []
        #: auto mode: decides per frame where its marks are (worker/media/auto.py)
        self.auto: Any = None
        self.crops_restored = 0

    # -- planning -------------------------------------------------------------
    def _stride(self) -> int:
        return max(1, math.ceil(self.total / max(self.samples, 1)))

    def _run(self, stage: str, compute, sink=None, *, finish=None, on_batch=None) -> StageTimes:
        def report(done: int) -> None:
            self._progress(done=min(done, self.total), total=self.total, unit="frames", stage=stage)

        times = run_pipeline(
            lambda: vio.demux(self.path, want_audio=sink is not None),
            compute,
            sink,
            batch_size=self.batch_size,
            on_batch=on_batch or report,
            check_cancelled=self._check,
            finish=finish,
        )
        self.times[stage] = times.as_dict()
        return times

    def plan_template(self, template_alpha: np.ndarray) -> None:
        """Locate the template in every frame and estimate its matte (a whole pass)."""
        tracker = _TemplateTracker(self, template_alpha, self._stride())

        def compute(frames: list) -> list:
            tracker.track(frames)
            return frames

        self._run("analyse", compute)
        tracker.estimate()

    def _template_placement(self, y: int, x: int, h: int, w: int, region: int = 0) -> Placement:
        """The crop around a mark at (y, x): margin on every side unless the frame ends."""
        fh, fw = self.info.height, self.info.width
        y0 = min(max(_even_floor(y - MARGIN), 0), _even_floor(fh - h))
        x0 = min(max(_even_floor(x - MARGIN), 0), _even_floor(fw - w))
        return Placement(region, y0, x0, (y - y0, x - x0))

    def plan_boxes(self, boxes: list[Box]) -> None:
        """Estimate a free-form matte per box from frames in its time range.

        Boxes with the same geometry (a mark returning to a spot) share one
        matte, estimated from all their time ranges.
        """
        fh, fw = self.info.height, self.info.width
        fps = float(self.info.fps)
        self.boxes, self.box_region = [], []
        by_geometry: dict[tuple[int, int, int, int], int] = {}
        spans: list[float] = []
        for i, b in enumerate(boxes):
            if b.w < 2 or b.h < 2 or b.x < 0 or b.y < 0 or b.x + b.w > fw or b.y + b.h > fh:
                raise PermanentError(
                    f"boxes[{i}] ({b.x},{b.y} {b.w}x{b.h}) is outside the {fw}x{fh} frame",
                    code="INVALID_PARAMS",
                )
            x0, y0 = _even_floor(max(b.x - MARGIN, 0)), _even_floor(max(b.y - MARGIN, 0))
            x1 = min(b.x + b.w + MARGIN, fw)
            y1 = min(b.y + b.h + MARGIN, fh)
            w, h = _even_floor(x1 - x0), _even_floor(y1 - y0)
            box = Box(x0, y0, w, h, b.start_s, b.end_s)
            self.boxes.append(box)
            key = (x0, y0, w, h)
            if key not in by_geometry:
                by_geometry[key] = len(self.regions)
                self.regions.append(Region(h=h, w=w))
                spans.append(0.0)
            ri = by_geometry[key]
            self.box_region.append(ri)
            end = min(b.end_s if b.end_s is not None else math.inf, self.total / fps)
            spans[ri] += max(end - b.start_s, 0.0) * fps
        strides = [max(1, math.ceil(span / max(self.samples, 1))) for span in spans]
        ys: list[list[np.ndarray]] = [[] for _ in self.regions]
        uvs: list[list[np.ndarray]] = [[] for _ in self.regions]
        seen = [0] * len(self.regions)

        def compute(frames: list) -> list:
            for frame in frames:
                t = float(frame.time or 0.0)
                views = None
                done: set[int] = set()
                for i, b in enumerate(self.boxes):
                    ri = self.box_region[i]
                    if ri in done or not b.active(t):
                        continue
                    done.add(ri)
                    seen[ri] += 1
                    if (seen[ri] - 1) % strides[ri] or len(ys[ri]) >= self.samples:
                        continue
                    views = views or vio.plane_views(frame)
                    y, uv = _crop_yuv(views, b.y, b.x, b.h, b.w)
                    ys[ri].append(y.copy())
                    uvs[ri].append(uv.copy())
            return frames

        self._run("analyse", compute)
        for ri, region in enumerate(self.regions):
            if len(ys[ri]) >= 3:
                self._estimate(region, ys[ri], uvs[ri], template=False)

    def plan_auto(self, max_marks: int = 3) -> list[Box]:
        """Find static marks: structure whose gradient survives the median over time."""
        fh, fw = self.info.height, self.info.width
        factor = max(1, math.ceil(max(fw, fh) / 640))
        stride = self._stride()
        grads: list[np.ndarray] = []
        count = [0]

        def compute(frames: list) -> list:
            for frame in frames:
                idx = count[0]
                count[0] += 1
                if idx % stride or len(grads) >= self.samples:
                    continue
                y = vio.plane_views(frame)[0].astype(np.float32)
                if factor > 1:
                    y = cv2.resize(y, (fw // factor, fh // factor), interpolation=cv2.INTER_AREA)
                gx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3)
                gy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3)
                grads.append(np.stack([gx, gy]).astype(np.float16))
            return frames

        self._run("detect", compute)
        if len(grads) < 5:
            return []
        med = np.median(np.stack(grads).astype(np.float32), axis=0)
        mag = np.hypot(med[0], med[1])
        thr = max(12.0, 6.0 * float(np.median(mag)))
        mask = (mag > thr).astype(np.uint8)
        mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        found = sorted(
            (stats[i] for i in range(1, n) if stats[i][cv2.CC_STAT_AREA] >= 12),
            key=lambda s: -s[cv2.CC_STAT_AREA],
        )[:max_marks]
        boxes = []
        for s in found:
            x, y = int(s[0]) * factor, int(s[1]) * factor
            w, h = int(s[2]) * factor, int(s[3]) * factor
            boxes.append(Box(x, y, min(w, fw - x), min(h, fh - y)))
            self.detected.append({"x": x, "y": y, "w": w, "h": h})
        return boxes

    def _estimate(
        self,
        region: Region,
        ys: list[np.ndarray],
        uvs: list[np.ndarray],
        *,
        template: bool,
        opacity: float | None = None,
        colour: tuple[float, float, float] | None = None,
    ) -> None:
        """Fit the region's matte on aligned crops; `opacity` / `colour` (Y, U, V) when known."""
        y = self.stager.to_device(np.stack(ys)[:, None]).float()
        uv = self.stager.to_device(np.stack(uvs)).float()
        matte = estimate_matte(
            y, shape=region.shape if template else None, ring=MARGIN // 2, opacity=opacity
        )
        if colour is not None:
            matte.colour = torch.tensor(colour[:1], device=y.device)
        region.opacity = matte.opacity
        region.shape = (matte.alpha / max(matte.opacity, 1e-6)).clamp(0, 1)
        region.colour_y = matte.colour
        if colour is not None:
            region.colour_uv = torch.tensor(colour[1:], device=y.device)
        else:
            region.colour_uv = fit_colour(uv, downsample_alpha(matte.alpha, 2))
        region.alpha_stats = matte.stats()
        region.alpha_stats["colour_uv"] = [round(float(c), 2) for c in region.colour_uv]
        region.alpha_stats["samples"] = len(ys)
        y8, uv8 = y.to(torch.uint8), uv.to(torch.uint8)
        a_uv = downsample_alpha(matte.alpha, 2)
        region.opts_y = region.opts_uv = self.options
        if self.options.method != "invert":
            region.opts_y = choose_fill(y8, matte.alpha, matte.colour, self.options)
            # Chroma has no noise model (below): in hybrid it is only filled above alpha_lo.
            if self.options.method == "inpaint" or float(a_uv.max()) > self.options.alpha_lo:
                region.opts_uv = choose_fill(uv8, a_uv, region.colour_uv, self.options)
            region.alpha_stats["fill"] = [region.opts_y.inpaint_algo, region.opts_uv.inpaint_algo]
        if self.options.method == "hybrid":
            region.noise_y = calibrate_noise(y8, matte.alpha, matte.colour, region.opts_y)
            # No noise model for chroma: H.264 smooths U/V across the mark's edge
            # for the inversion and the fill alike, so their errors correlate and
            # the split of their difference (which assumes independence) credits
            # the fill with far too little error. Measured through H.264 at 720p,
            # mixing chroma by that model cost 0.6-1.1 dB against pure inversion;
            # U/V follow the alpha ramp alone (invert below alpha_lo).
            region.noise_uv = None
            for key, nm in (("noise_y", region.noise_y), ("noise_uv", region.noise_uv)):
                if nm is not None:
                    region.alpha_stats[key] = {
                        "invert_var": round(nm.invert_var, 3),
                        "inpaint_var": round(nm.inpaint_var, 3),
                    }

    # -- restoring ------------------------------------------------------------
    def _placements(self, idx: int, t: float) -> list[Placement]:
        out = []
        if self.boxes:
            seen: set[int] = set()
            for i, b in enumerate(self.boxes):
                ri = self.box_region[i]
                if ri not in seen and b.active(t) and self.regions[ri].colour_y is not None:
                    seen.add(ri)
                    out.append(Placement(ri, b.y, b.x))
        elif self.regions and self.regions[0].colour_y is not None and idx < len(self.positions):
            pos = self.positions[idx]
            if pos is not None:
                r = self.regions[0]
                out.append(self._template_placement(pos[0], pos[1], r.h, r.w))
        return out

    def restore_batch(self, frames: list, first_index: int) -> int:
        """Restore every placement in `frames` in place; returns how many crops were done."""
        groups: dict[tuple[int, tuple[int, int]], list[tuple[list[np.ndarray], Placement]]] = {}
        decided = self.auto.placements(frames, first_index) if self.auto is not None else None
        for k, frame in enumerate(frames):
            if decided is not None:
                pls = decided[k]
            else:
                pls = self._placements(first_index + k, float(frame.time or 0.0))
            if not pls:
                continue
            frame.make_writable()  # decoded buffers may still be reference frames
            views = vio.plane_views(frame)
            for pl in pls:
                groups.setdefault((pl.region, pl.offset), []).append((views, pl))
        done = 0
        for (ri, offset), items in groups.items():
            region = self.regions[ri]
            a_y, a_uv = region.alphas(offset)
            p_y, p_uv = region.plans(offset, self.options)
            o_y, o_uv = region.opts_y or self.options, region.opts_uv or self.options
            crops = [_crop_yuv(v, pl.y0, pl.x0, region.h, region.w) for v, pl in items]
            y = self.stager.to_device(np.stack([c[0] for c in crops])[:, None])
            uv = self.stager.to_device(np.stack([c[1] for c in crops]))
            assert region.colour_y is not None and region.colour_uv is not None
            y_out = restore_crops(y, a_y, region.colour_y, o_y, plan=p_y)
            uv_out = restore_crops(uv, a_uv, region.colour_uv, o_uv, plan=p_uv)
            y_out, uv_out = Stager.to_host(y_out), Stager.to_host(uv_out)
            for n, (views, pl) in enumerate(items):
                views[0][pl.y0 : pl.y0 + region.h, pl.x0 : pl.x0 + region.w] = y_out[n, 0]
                hy, wx = region.h // 2, region.w // 2
                for c in (1, 2):
                    views[c][pl.y0 // 2 : pl.y0 // 2 + hy, pl.x0 // 2 : pl.x0 // 2 + wx] = uv_out[
                        n, c - 1
                    ]
                done += 1
        return done

    def _writer(self, out_path: Path, crf: int, preset: str) -> vio.VideoWriter:
        kw: dict[str, Any] = {
            "width": self.info.width,
            "height": self.info.height,
            "fps": self.info.fps,
            "time_base": self.info.time_base,
            "codec": vio.pick_encoder("h264", self.device.type),
            "crf": crf,
            "preset": preset,
        }
        if not self.info.has_audio:
            return vio.VideoWriter(out_path, **kw)
        import av

        with av.open(str(self.path)) as c:
            template = c.streams.audio[0] if c.streams.audio else None
            return vio.VideoWriter(out_path, audio_template=template, **kw)

    def _encode(self, stage: str, out_path: Path, crf: int, preset: str, compute, **kw) -> int:
        """Run `compute` over the video into an encoder at `out_path`; frames written."""
        writer = self._writer(out_path, crf, preset)

        def sink(kind: str, item: Any) -> None:
            if kind == "video":
                writer.write(item)
            else:
                writer.write_audio(item)

        ok = False
        try:
            self._run(stage, compute, sink, **kw)
            ok = True
        finally:
            writer.close(flush=ok)
        return writer.frames

    def restore(self, out_path: Path, *, crf: int = 20, preset: str = "veryfast") -> int:
        """Second pass: restore and encode to `out_path`; returns frames written."""
        index = [0]
        self.crops_restored = 0

        def compute(frames: list) -> list:
            self.crops_restored += self.restore_batch(frames, index[0])
            index[0] += len(frames)
            return frames

        return self._encode("restore", out_path, crf, preset, compute)

    def warmup_frames(self) -> int:
        """How many decoded frames the one-pass template mode may hold (0: too big)."""
        frame_bytes = self.info.width * self.info.height * 3 // 2
        n = min(WARMUP_BYTES // max(frame_bytes, 1), WARMUP_MAX_FRAMES, self.total)
        return n if n >= min(MIN_WARMUP_FRAMES, self.total) else 0

    def remove_template(
        self,
        template_alpha: np.ndarray,
        out_path: Path,
        *,
        crf: int = 20,
        preset: str = "veryfast",
        full_analysis: bool = False,
    ) -> int:
        """Template mode end to end; returns frames written.

        One decode: the first `warmup_frames()` frames are located and held
        (bounded bytes), the matte is estimated from samples spread over them,
        they are restored and passed to the encoder, and the rest of the video
        is located and restored as it streams. When the video is longer than
        that prefix and the mark shows in too few of its frames, or when
        `full_analysis` asks for samples spread over the whole video, the
        classic two passes run instead (analyse everything, then restore).
        """
        window = 0 if full_analysis else self.warmup_frames()
        if window:
            try:
                return self._one_pass(template_alpha, out_path, window, crf, preset)
            except _NeedFullAnalysis:
                self.positions.clear()
                self.times.clear()
        self.plan_template(template_alpha)
        return self.restore(out_path, crf=crf, preset=preset)

    def _one_pass(
        self, template_alpha: np.ndarray, out_path: Path, window: int, crf: int, preset: str
    ) -> int:
        tracker = _TemplateTracker(self, template_alpha, max(1, math.ceil(window / self.samples)))
        held: list = []
        state = {"ready": False, "restored": 0}
        self.crops_restored = 0

        def restore(frames: list) -> Iterator[Any]:
            # Lazily, a batch at a time: the encoder starts on the first batch
            # of the held prefix while the rest is being restored.
            for i in range(0, len(frames), self.batch_size):
                chunk = frames[i : i + self.batch_size]
                self.crops_restored += self.restore_batch(chunk, state["restored"])
                state["restored"] += len(chunk)
                yield from chunk

        def finish_warmup(video_ended: bool) -> Iterator[Any]:
            enough = min(MIN_WARMUP_SAMPLES, self.samples)
            if not video_ended and tracker.best_group_size() < enough:
                raise _NeedFullAnalysis
            t = time.perf_counter()
            with cpu_threads(self.device, HEAD_THREADS):
                tracker.estimate()
            state["ready"] = True
            self.times["analyse"] = {
                "frames": len(held),
                "in_restore_pass": True,
                "matte_s": round(time.perf_counter() - t, 3),
            }
            out = restore(held[:])
            held.clear()
            return out

        def compute(frames: list) -> Iterable[Any]:
            tracker.track(frames)
            if state["ready"]:
                return restore(frames)
            held.extend(frames)
            if len(held) < window:
                return []
            return finish_warmup(video_ended=False)

        def finish() -> Iterable[Any]:
            return [] if state["ready"] else finish_warmup(video_ended=True)

        def progress(_: int) -> None:
            if state["ready"]:
                done, stage = state["restored"], "restore"
            else:
                done, stage = len(self.positions), "analyse"
            self._progress(done=min(done, self.total), total=self.total, unit="frames", stage=stage)

        return self._encode(
            "restore", out_path, crf, preset, compute, finish=finish, on_batch=progress
        )


class _NeedFullAnalysis(Exception):
    """Internal: the prefix did not show the mark enough; analyse the whole video."""


class _TemplateTracker:
    """Locates a template frame by frame and keeps aligned matte samples (bounded)."""

    def __init__(self, remover: OverlayRemover, template_alpha: np.ndarray, stride: int) -> None:
        th, tw = template_alpha.shape
        fh, fw = remover.info.height, remover.info.width
        self.h = min(_even_floor(th + 2 * MARGIN + 1) + 2, _even_floor(fh))
        self.w = min(_even_floor(tw + 2 * MARGIN + 1) + 2, _even_floor(fw))
        self.remover, self.stride = remover, stride
        self.tmpl = torch.from_numpy(template_alpha).to(remover.device)
        self.region = Region(h=self.h, w=self.w, shape=self.tmpl, template=True)
        remover.regions = [self.region]
        remover.locate_full_searches = 0
        self.locator = Locator(
            self.tmpl,
            min_score=remover.min_score,
            recheck_every=remover.recheck_every,
            device=remover.device,
        )
        self.ys: dict[tuple[int, int], list[np.ndarray]] = {}
        self.uvs: dict[tuple[int, int], list[np.ndarray]] = {}
        self.kept = 0

    def track(self, frames: list) -> None:
        """Append each frame's position to `remover.positions`; sample crops on the stride."""
        r, positions = self.remover, self.remover.positions
        for frame in frames:
            views = vio.plane_views(frame)
            # A view, no copy: the locator moves only what it needs to the device.
            m = self.locator.locate(torch.from_numpy(views[0]))
            idx = len(positions)
            positions.append((m.y, m.x, m.score) if m else None)
            if m is None or idx % self.stride or self.kept >= r.samples:
                continue
            pl = r._template_placement(m.y, m.x, self.h, self.w)
            y, uv = _crop_yuv(views, pl.y0, pl.x0, self.h, self.w)
            self.ys.setdefault(pl.offset, []).append(y.copy())
            self.uvs.setdefault(pl.offset, []).append(uv.copy())
            self.kept += 1
        r.locate_full_searches = self.locator.full_searches

    def best_group_size(self) -> int:
        """Samples in the largest group of aligned crops."""
        return max(map(len, self.ys.values()), default=0)

    def estimate(self) -> None:
        """Fit the matte on the largest aligned group (no samples: nothing to remove)."""
        if not self.ys:
            return
        # Samples are aligned only within one offset group: estimate from the largest.
        offset = max(self.ys, key=lambda k: len(self.ys[k]))
        oy, ox = offset
        th, tw = self.tmpl.shape
        h, w, region = self.h, self.w, self.region
        canvas = torch.zeros(h, w, device=self.remover.device)
        canvas[oy : oy + th, ox : ox + tw] = self.tmpl[: h - oy, : w - ox]
        region.template = False
        region.shape = canvas
        self.remover._estimate(region, self.ys[offset], self.uvs[offset], template=True)
        region.shape = region.shape[oy : oy + th, ox : ox + tw].contiguous()
        region.template = True
        region._alphas.clear()
        region._plans.clear()
        self.ys.clear()
        self.uvs.clear()
