"""`video.remove_overlay`: remove a semi-transparent logo, watermark or burned-in overlay.

Inputs: the video (input 0) and, in `template` mode, a PNG of the mark with an
alpha channel (input 1). Outputs: `clean.mp4` (same frame count, fps and
resolution, H.264, audio copied) and `report.json` (positions found, matte
statistics, per-stage speed). See docs/media.md.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from worker.sdk import Handler, JobContext, PermanentError


class BoxParam(BaseModel):
    """A region holding the mark, optionally limited to a time range (seconds)."""

    model_config = {"extra": "forbid"}

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=2, le=8192)
    h: int = Field(ge=2, le=8192)
    start_s: float = Field(default=0.0, ge=0.0)
    end_s: float | None = Field(default=None, gt=0.0)


class RemoveOverlayParams(BaseModel):
    """Parameters of `video.remove_overlay`."""

    model_config = {"extra": "forbid"}

    #: template (input 1 is a PNG with alpha), boxes (given regions) or auto (find
    #: static marks); default: template with two inputs, boxes when given, else auto
    mode: Literal["template", "boxes", "auto"] | None = None
    boxes: list[BoxParam] = Field(default_factory=list, max_length=64)
    #: invert the blend, inpaint, or choose per pixel by alpha
    method: Literal["invert", "inpaint", "hybrid"] = "hybrid"
    #: hybrid: invert at or below alpha_lo, inpaint at or above alpha_hi
    alpha_lo: float = Field(default=0.7, ge=0.0, le=1.0)
    alpha_hi: float = Field(default=0.85, ge=0.0, le=1.0)
    #: template mode: minimum |NCC| for the mark to count as present
    min_score: float = Field(default=0.35, gt=0.0, le=1.0)
    #: template mode: full search at least every this many frames
    recheck_every: int = Field(default=30, ge=1, le=10_000)
    #: frames used to estimate each mark's matte
    samples: int = Field(default=48, ge=3, le=512)
    #: template mode: spread the matte samples over the whole video (one more
    #: decode) instead of over the prefix the one-pass mode holds in memory
    full_analysis: bool = False
    #: auto: harmonic or biharmonic per mark (fitted on the samples); ns / telea: OpenCV
    inpaint_algo: Literal["auto", "biharmonic", "harmonic", "ns", "telea"] = "auto"
    inpaint_radius: int = Field(default=3, ge=1, le=32)
    mask_dilate: int = Field(default=0, ge=0, le=8)
    crf: int = Field(default=20, ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = (
        "veryfast"
    )
    batch_size: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> RemoveOverlayParams:
        if self.alpha_lo > self.alpha_hi:
            raise ValueError("alpha_lo must not exceed alpha_hi")
        if self.mode == "boxes" and not self.boxes:
            raise ValueError("mode 'boxes' needs at least one box")
        for i, b in enumerate(self.boxes):
            if b.end_s is not None and b.end_s <= b.start_s:
                raise ValueError(f"boxes[{i}]: end_s must be after start_s")
        return self


def _runs(positions: list) -> list[dict[str, Any]]:
    """Compress per-frame positions into runs of frames at one spot."""
    runs: list[dict[str, Any]] = []
    for i, p in enumerate(positions):
        key = None if p is None else (p[0], p[1])
        if runs and runs[-1]["_key"] == key and runs[-1]["end_frame"] == i - 1:
            runs[-1]["end_frame"] = i
            if p is not None:
                runs[-1]["min_score"] = round(min(runs[-1]["min_score"], p[2]), 3)
            continue
        runs.append(
            {
                "_key": key,
                "start_frame": i,
                "end_frame": i,
                "found": p is not None,
                **({"y": p[0], "x": p[1], "min_score": round(p[2], 3)} if p else {}),
            }
        )
    for r in runs:
        r.pop("_key")
    return runs


class RemoveOverlay(Handler):
    """Locate the mark, estimate its matte from many frames, invert/inpaint, re-encode."""

    name = "video.remove_overlay"
    Params = RemoveOverlayParams
    max_attempts = 2

    def setup(self, device: str) -> None:
        # Imported here so the registry can list the type without paying for torch.
        from worker.media.device import pick_device

        self.device = pick_device(device)

    def run(self, ctx: JobContext, params: RemoveOverlayParams) -> dict[str, Any]:
        from worker.media.device import cpu_threads

        device = getattr(self, "device", None)
        if device is None:
            self.setup(ctx.device)
            device = self.device
        with cpu_threads(device):
            return self._run(ctx, params, device)

    def _run(self, ctx: JobContext, params: RemoveOverlayParams, device: Any) -> dict[str, Any]:
        from worker.media import io as vio
        from worker.media.overlay import Box, OverlayRemover, load_template
        from worker.media.restore import RestoreOptions

        started = time.perf_counter()
        path = ctx.input_path(0)
        info = vio.probe(path)
        if info.width % 2 or info.height % 2:
            # yuv420p output at the same size needs even dimensions
            raise PermanentError(
                f"video is {info.width}x{info.height}; odd dimensions are not supported",
                code="INVALID_VIDEO",
            )
        mode = params.mode or (
            "template" if len(ctx.inputs) > 1 else "boxes" if params.boxes else "auto"
        )
        if mode == "template" and len(ctx.inputs) < 2:
            raise PermanentError(
                "mode 'template' needs the template PNG as input 1", code="INVALID_INPUT"
            )
        opts = RestoreOptions(
            method=params.method,
            alpha_lo=params.alpha_lo,
            alpha_hi=params.alpha_hi,
            inpaint_algo=params.inpaint_algo,
            inpaint_radius=params.inpaint_radius,
            mask_dilate=params.mask_dilate,
        )
        remover = OverlayRemover(
            path,
            info,
            device=device,
            options=opts,
            samples=params.samples,
            batch_size=params.batch_size,
            recheck_every=params.recheck_every,
            min_score=params.min_score,
            progress=ctx.progress,
            check_cancelled=ctx.check_cancelled,
        )
        out = ctx.output_path("clean.mp4")
        if mode == "template":
            template = load_template(ctx.input_path(1), info.width, info.height)
            frames = remover.remove_template(
                template,
                out,
                crf=params.crf,
                preset=params.preset,
                full_analysis=params.full_analysis,
            )
        else:
            if mode == "boxes":
                remover.plan_boxes([Box(**b.model_dump()) for b in params.boxes])
            else:
                from worker.media.auto import AutoPlanner

                planner = AutoPlanner(remover)
                remover.auto = planner
                planner.plan()
            frames = remover.restore(out, crf=params.crf, preset=params.preset)
        ctx.progress(done=frames, total=frames, unit="frames", stage="done")
        regions = [
            {"h": r.h, "w": r.w, **r.alpha_stats} for r in remover.regions if r.colour_y is not None
        ]
        report: dict[str, Any] = {
            "mode": mode,
            "method": params.method,
            "video": info.as_dict(),
            "frames_written": frames,
            "crops_restored": remover.crops_restored,
            "marks": regions,
            "stages": remover.times,
            "elapsed_s": round(time.perf_counter() - started, 3),
            "device": str(device),
        }
        if mode == "template":
            report["positions"] = _runs(remover.positions)
            report["frames_with_mark"] = sum(p is not None for p in remover.positions)
            report["full_searches"] = remover.locate_full_searches
        else:
            report["boxes"] = [b.__dict__ for b in remover.boxes]
            if mode == "auto":
                report["detected"] = remover.detected
                report["auto"] = remover.auto.report()
                report["frames_with_mark"] = remover.crops_restored
        ctx.output_path("report.json").write_text(json.dumps(report, indent=2))
        return {
            "mode": mode,
            "frames": frames,
            "marks": len(regions),
            "crops_restored": remover.crops_restored,
            "frames_with_mark": report.get("frames_with_mark", remover.crops_restored),
            "fps": remover.times.get("restore", {}).get("end_to_end_fps"),
        }
