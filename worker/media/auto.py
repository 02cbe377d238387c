"""`auto` mode: find marks that stay, jump, come and go, with nothing but the video.

Three streaming passes on `run_pipeline`, memory bounded whatever the length:

1. *detect* (`worker/media/detect.py`): per-window structure maps at low
   resolution give candidate spots and the windows in which each is active.
2. *analyse*: for every candidate spot, small crops (full resolution, Y and
   U/V) from frames of its active windows, and, with a still camera, from
   frames where it is not active (`worker/media/auto_spots.py`). Between
   this pass and the next, nothing decodes or encodes:
   - each candidate must be *explained by the blend model*
     `J = (1-a) I + a W` with one colour and one matte
     (`worker/media/auto_blend.py`);
   - candidates whose shapes match (a jumping mark's spots) become one mark;
     over a moving scene its template is pooled over all its spots and
     grown to the whole mark where a box had cut it, then looked for again
     (`worker/media/auto_marks.py`, `worker/media/auto_grow.py`); its
     matte is estimated from the aligned crops of all its spots
     (`worker/media/auto_matte.py`).
3. *restore*: at each of its spots, per frame, a mark is taken as present
   when inverting the blend there removes its pattern instead of adding it
   (`worker/media/auto_track.py`, with hysteresis); only then is the crop
   restored. Frames without the mark are left as they are.

`AutoPlanner.report()` gives what was found as runs (frames, box, score) and
every rejected candidate with its reason, for report.json.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.media import io as vio
from worker.media.auto_blend import BlendTest
from worker.media.auto_marks import MarkBuilder
from worker.media.auto_spots import Rejections, SpotData, spot_data
from worker.media.auto_track import AutoMark, MarkTracker
from worker.media.detect import Detection, DetectPass, find_spots
from worker.media.restore import inpaint_threads

if TYPE_CHECKING:
    from worker.media.overlay import OverlayRemover, Placement

#: threads for the analysis between the passes (candidates tested, templates
#: searched and OpenCV's fills at once)
PLAN_THREADS = max(1, min(os.cpu_count() or 1, 4))
#: report.json's mark mask: the pixels where the mark's shape exceeds this
MASK_LEVEL = 0.1


class AutoPlanner:
    """Runs detect and analyse for an `OverlayRemover`, then decides placements per frame."""

    def __init__(self, remover: OverlayRemover) -> None:
        self.r = remover
        self.det: Detection | None = None
        self.marks: list[AutoMark] = []
        self.rejections = Rejections()
        self.candidates = 0
        self.tracker = MarkTracker(remover, self.marks)

    @property
    def rejected(self) -> list[dict[str, Any]]:
        """The candidates set aside, with their reasons."""
        return self.rejections.entries()

    def plan(self) -> None:
        """Detect candidates, analyse them, keep the ones the blend model explains."""
        r = self.r
        info = r.info
        dp = DetectPass(info.width, info.height, r.total, device=r.device)
        count = [0]

        def detect(frames: list) -> list:
            for frame in frames:
                dp.add(count[0], vio.plane_views(frame)[0])
                count[0] += 1
            return frames

        r._run("detect", detect)
        self.det = det = dp.finish()
        spots, rejected = find_spots(det)
        self.rejections = Rejections(rejected)
        self.candidates = len(spots)
        if not spots:
            return
        data = [spot_data(s, det, info.height, info.width) for s in spots]
        wanted: dict[int, list[tuple[SpotData, bool]]] = {}
        for d in data:
            for frames, on in ((d.on_frames, True), (d.off_frames, False)):
                for i in frames:
                    wanted.setdefault(i, []).append((d, on))
        count[0] = 0

        def analyse(frames: list) -> list:
            for frame in frames:
                for d, on in wanted.get(count[0], ()):
                    views = vio.plane_views(frame)
                    y = views[0][d.y0 : d.y0 + d.h, d.x0 : d.x0 + d.w].copy()
                    uv = np.stack(
                        [
                            v[d.y0 // 2 : (d.y0 + d.h) // 2, d.x0 // 2 : (d.x0 + d.w) // 2]
                            for v in views[1:]
                        ]
                    )
                    if on:
                        d.on_idx.append(count[0])
                    (d.on_y if on else d.off_y).append(y)
                    (d.on_uv if on else d.off_uv).append(uv)
                count[0] += 1
            return frames

        r._run("analyse", analyse)

        # Nothing decodes or encodes between the passes: the cores are free. The
        # candidates are tested in parallel threads (torch, numpy and OpenCV
        # release the GIL; torch's own threads did not pay on these small
        # crops), each into its own record of rejections, merged in order.
        def explain(d: SpotData) -> tuple[bool, Rejections]:
            own = Rejections()
            return BlendTest(det, r.options, own).explain(d), own

        with ThreadPoolExecutor(PLAN_THREADS) as pool:
            verdicts = list(pool.map(explain, data))
        for _, own in verdicts:
            self.rejections.extend(own)
        accepted = [d for d, (ok, _) in zip(data, verdicts, strict=True) if ok]
        with inpaint_threads(PLAN_THREADS):
            builder = MarkBuilder(
                r, still=not det.moving, rejections=self.rejections, threads=PLAN_THREADS
            )
            self.marks = builder.build(data, accepted)
        self.tracker = MarkTracker(r, self.marks)

    def placements(self, frames: list, first_index: int) -> list[list[Placement]]:
        """Per frame of the batch, the placements of the marks present in it."""
        return self.tracker.placements(frames, first_index)

    def report(self) -> dict[str, Any]:
        """What report.json says about auto mode."""
        det = self.det
        return {
            "scene": None if det is None else ("moving" if det.moving else "still"),
            "windows": 0 if det is None else len(det.starts),
            "candidates": self.candidates,
            "marks": [
                {
                    "mark": i,
                    "region": m.region,
                    "spots": [{"y": y, "x": x} for y, x in m.spots],
                    "runs": [{k: v for k, v in run.items() if k != "spot"} for run in m.runs],
                    "mask": _mask_rle(self.r.regions[m.region].shape),
                    "frames_with_mark": sum(
                        run["end_frame"] - run["start_frame"] + 1 for run in m.runs
                    ),
                }
                for i, m in enumerate(self.marks)
            ],
            "rejected": self.rejected,
        }


def _mask_rle(shape: torch.Tensor | None) -> dict[str, Any]:
    """The mark's pixels (shape > MASK_LEVEL) as run lengths, row-major, zeros first."""
    if shape is None:
        return {"h": 0, "w": 0, "rle": []}
    flat = (shape > MASK_LEVEL).flatten().cpu().numpy().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    rle = np.diff(np.concatenate([[0], edges])).tolist()
    return {"h": int(shape.shape[0]), "w": int(shape.shape[1]), "rle": rle}


def mask_from_rle(mask: dict[str, Any]) -> np.ndarray:
    """The boolean (h, w) mask `_mask_rle` encoded."""
    out = np.zeros(mask["h"] * mask["w"], bool)
    pos, val = 0, False
    for n in mask["rle"]:
        out[pos : pos + n] = val
        pos, val = pos + n, not val
    return out.reshape(mask["h"], mask["w"])
