"""`video.transcode`: crop, resize, change frame rate and codec; audio kept.

Input 0 is the video; the output is `out.mp4` (or `out.webm` for VP9 when
asked with `container: webm`). Runs on the same bounded decode → compute →
encode pipeline as the other video jobs.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from worker.sdk import Handler, JobContext, PermanentError


class CropParam(BaseModel):
    """A rectangle to keep, in source pixels (rounded down to even numbers)."""

    model_config = {"extra": "forbid"}

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=2, le=8192)
    h: int = Field(ge=2, le=8192)


class TranscodeParams(BaseModel):
    """Parameters of `video.transcode`; everything unset keeps the source's value."""

    model_config = {"extra": "forbid"}

    #: output width/height; give one to keep the aspect ratio (rounded to even)
    width: int | None = Field(default=None, ge=2, le=8192)
    height: int | None = Field(default=None, ge=2, le=8192)
    crop: CropParam | None = None
    #: output frame rate (frames are dropped or repeated by timestamp)
    fps: float | None = Field(default=None, gt=0, le=240)
    codec: Literal["libx264", "libx265", "libvpx-vp9", "libsvtav1", "h264"] = "libx264"
    crf: int = Field(default=23, ge=0, le=63)
    #: x264/x265 preset name, or an SVT-AV1 preset number
    preset: str = Field(default="veryfast", pattern=r"^[a-z0-9]{1,12}$")
    audio: bool = True
    container: Literal["mp4", "webm", "mkv"] = "mp4"
    batch_size: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> TranscodeParams:
        if self.container == "webm" and self.codec not in ("libvpx-vp9", "libsvtav1"):
            raise ValueError("webm holds only VP9 or AV1 (codec libvpx-vp9 or libsvtav1)")
        return self


def _even(v: float) -> int:
    return max(2, int(v) - int(v) % 2)


class Transcode(Handler):
    """Decode, crop/resize/retime, encode with the chosen codec, copy the audio."""

    name = "video.transcode"
    Params = TranscodeParams
    max_attempts = 2

    def run(self, ctx: JobContext, params: TranscodeParams) -> dict[str, Any]:
        import av
        import numpy as np

        from worker.media import io as vio
        from worker.media.pipeline import run_pipeline

        started = time.perf_counter()
        path = ctx.input_path(0)
        info = vio.probe(path)
        cx, cy, cw, ch = 0, 0, info.width, info.height
        if params.crop is not None:
            c = params.crop
            if c.x + c.w > info.width or c.y + c.h > info.height:
                raise PermanentError(
                    f"crop ({c.x},{c.y} {c.w}x{c.h}) is outside the "
                    f"{info.width}x{info.height} frame",
                    code="INVALID_PARAMS",
                )
            cx, cy, cw, ch = _even(c.x) if c.x else 0, _even(c.y) if c.y else 0, c.w, c.h
            cw, ch = _even(cw), _even(ch)
        out_w, out_h = cw, ch
        if params.width and params.height:
            out_w, out_h = params.width, params.height
        elif params.width:
            out_w, out_h = params.width, params.width * ch / cw
        elif params.height:
            out_w, out_h = params.height * cw / ch, params.height
        out_w, out_h = _even(out_w), _even(out_h)
        fps = Fraction(params.fps).limit_denominator(1001) if params.fps else info.fps
        retime = params.fps is not None
        codec = vio.pick_encoder(params.codec, ctx.device)
        total = info.frames or max(1, round(info.duration_s * float(info.fps)))
        total_out = max(1, round(total * float(fps) / float(info.fps))) if retime else total

        audio_template = None
        in_container = None
        if params.audio and info.has_audio:
            in_container = av.open(str(path))
            audio_template = in_container.streams.audio[0]
        out_path = ctx.output_path(f"out.{params.container}")
        try:
            writer = vio.VideoWriter(
                out_path,
                width=out_w,
                height=out_h,
                fps=fps,
                time_base=Fraction(1, 1) / fps if retime else info.time_base,
                codec=codec,
                crf=params.crf,
                preset=params.preset,
                audio_template=audio_template,
            )
        except (av.FFmpegError, ValueError) as exc:
            raise PermanentError(
                f"cannot encode {codec} at {out_w}x{out_h}: {exc}", code="INVALID_PARAMS"
            ) from exc
        finally:
            if in_container is not None:
                in_container.close()

        next_out = [0]
        cropping = (cx, cy, cw, ch) != (0, 0, info.width, info.height)
        scaling = (out_w, out_h) != (cw, ch)

        def convert(frame: av.VideoFrame) -> av.VideoFrame:
            if cropping:
                planes = vio.plane_views(frame)
                y = planes[0][cy : cy + ch, cx : cx + cw]
                u = planes[1][cy // 2 : (cy + ch) // 2, cx // 2 : (cx + cw) // 2]
                v = planes[2][cy // 2 : (cy + ch) // 2, cx // 2 : (cx + cw) // 2]
                packed = np.concatenate([y, u.reshape(-1, cw), v.reshape(-1, cw)])
                new = av.VideoFrame.from_ndarray(packed, format="yuv420p")
                new.pts, new.time_base = frame.pts, frame.time_base
                frame = new
            if scaling:
                pts, tb = frame.pts, frame.time_base
                frame = frame.reformat(
                    width=out_w, height=out_h, format="yuv420p", interpolation="BILINEAR"
                )
                frame.pts, frame.time_base = pts, tb
            return frame

        def compute(frames: list) -> list:
            out = []
            for frame in frames:
                frame = convert(frame)
                if not retime:
                    out.append(frame)
                    continue
                # The output slot this frame's time falls in; repeat or drop to fill.
                t = float(frame.time or 0.0)
                target = math.floor(t * fps + Fraction(1, 1000))
                while next_out[0] <= target:
                    copy = frame if next_out[0] == target else convert_copy(frame)
                    copy.pts, copy.time_base = next_out[0], Fraction(1, 1) / fps
                    out.append(copy)
                    next_out[0] += 1
            return out

        def convert_copy(frame: av.VideoFrame) -> av.VideoFrame:
            # A real copy: the repeated frame needs its own pts.
            return av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")

        def sink(kind: str, item: Any) -> None:
            if kind == "video":
                writer.write(item)
            else:
                writer.write_audio(item)

        def on_batch(done: int) -> None:
            ctx.progress(done=min(done, total), total=total, unit="frames", stage="transcode")

        ok = False
        try:
            times = run_pipeline(
                lambda: vio.demux(path, want_audio=audio_template is not None),
                compute,
                sink,
                batch_size=params.batch_size,
                on_batch=on_batch,
                check_cancelled=ctx.check_cancelled,
            )
            ok = True
        except av.FFmpegError as exc:
            raise PermanentError(
                f"encoding with {codec} failed: {exc}", code="INVALID_PARAMS"
            ) from exc
        finally:
            try:
                writer.close(flush=ok)
            except av.FFmpegError as exc:
                if ok:
                    raise PermanentError(f"encoding with {codec} failed: {exc}") from exc
        ctx.progress(done=writer.frames, total=writer.frames, unit="frames", stage="done")
        return {
            "codec": codec,
            "width": out_w,
            "height": out_h,
            "fps": float(fps),
            "frames_in": times.frames["decode"],
            "frames_out": writer.frames,
            "expected_frames_out": total_out,
            "audio": writer.audio is not None,
            "stages": times.as_dict(),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
