"""Video input and output with PyAV: probing, demux/decode, encode and audio remux.

Everything that can go wrong with a user's file is turned into a
`PermanentError` with code `INVALID_VIDEO` here, so handlers never see raw
FFmpeg exceptions for bad inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from worker.sdk import PermanentError

#: dimensions beyond this are refused (8K and a bit)
MAX_SIDE = 8192
#: encoders this build may use, in preference order for "h264"
H264_ENCODERS = ("h264_nvenc", "libx264")


@dataclass(frozen=True)
class VideoInfo:
    """What a probe of the input found."""

    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    frames: int  # 0 when the container does not say
    codec: str
    pix_fmt: str
    has_audio: bool
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for results and reports."""
        return {
            "width": self.width,
            "height": self.height,
            "fps": float(self.fps),
            "frames": self.frames,
            "codec": self.codec,
            "pix_fmt": self.pix_fmt,
            "has_audio": self.has_audio,
            "duration_s": round(self.duration_s, 3),
        }


def bad_video(message: str) -> PermanentError:
    """The error every unusable input becomes."""
    return PermanentError(message, code="INVALID_VIDEO")


def probe(path: str | Path) -> VideoInfo:
    """Open `path`, check it holds a decodable video stream, and describe it."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad_video(f"{Path(path).name}: no video stream")
            vs = container.streams.video[0]
            cc = vs.codec_context
            if not cc.width or not cc.height:
                raise bad_video(f"{Path(path).name}: video stream has no dimensions")
            if cc.width > MAX_SIDE or cc.height > MAX_SIDE:
                raise bad_video(f"video is {cc.width}x{cc.height}; at most {MAX_SIDE} per side")
            fps = vs.average_rate or vs.guessed_rate or Fraction(25)
            duration = 0.0
            if vs.duration is not None and vs.time_base:
                duration = float(vs.duration * vs.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
            # Decode one frame: a header alone does not prove the stream is usable.
            first = next(container.decode(vs), None)
            if first is None:
                raise bad_video(f"{Path(path).name}: the video stream has no frames")
            return VideoInfo(
                width=cc.width,
                height=cc.height,
                fps=Fraction(fps),
                time_base=vs.time_base or Fraction(1, 90000),
                frames=int(vs.frames or 0),
                codec=cc.name,
                pix_fmt=cc.format.name if cc.format else "",
                has_audio=bool(container.streams.audio),
                duration_s=duration,
            )
    except PermanentError:
        raise
    except (av.FFmpegError, ValueError, OSError, StopIteration) as exc:
        raise bad_video(f"{Path(path).name}: not a readable video ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words for a failure, without the worker's local path."""
    return getattr(exc, "strerror", None) or type(exc).__name__


def demux(path: str | Path, *, want_audio: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield ("video", VideoFrame in yuv420p) and ("audio", Packet) in file order.

    Decoding errors mid-file become `PermanentError(INVALID_VIDEO)`.
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise bad_video(f"{Path(path).name}: not a readable video ({_reason(exc)})") from exc
    try:
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        streams = [vs]
        if want_audio and container.streams.audio:
            streams.append(container.streams.audio[0])
        for packet in container.demux(*streams):
            if packet.stream.type == "audio":
                if packet.dts is not None:
                    yield "audio", packet
                continue
            for frame in packet.decode():
                if frame.format.name != "yuv420p":
                    frame = frame.reformat(format="yuv420p")
                yield "video", frame
    except av.FFmpegError as exc:
        raise bad_video(f"{Path(path).name}: decoding failed ({exc})") from exc
    finally:
        container.close()


def plane_views(frame: av.VideoFrame) -> list[np.ndarray]:
    """Writable (h, w) uint8 views of a yuv420p frame's Y, U and V planes."""
    views = []
    for plane in frame.planes:
        buf = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        views.append(buf[:, : plane.width])
    return views


def pick_encoder(codec: str, device: str) -> str:
    """Map a codec request to an encoder: "h264" means nvenc on CUDA when present."""
    if codec in ("h264", "libx264"):
        if device.startswith("cuda") and "h264_nvenc" in av.codecs_available:
            return "h264_nvenc"
        return "libx264"
    if codec not in av.codecs_available:
        raise PermanentError(
            f"codec {codec!r} is not available in this build", code="INVALID_PARAMS"
        )
    return codec


class VideoWriter:
    """Encode yuv420p frames to a file, copying the input's audio packets through."""

    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: Fraction,
        time_base: Fraction | None = None,
        codec: str = "libx264",
        crf: int | None = 20,
        preset: str | None = "veryfast",
        audio_template: Any = None,
    ) -> None:
        self.container = av.open(str(path), "w")
        try:
            self.stream = self.container.add_stream(codec, rate=fps)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"
            if time_base is not None:
                self.stream.codec_context.time_base = time_base
            options: dict[str, str] = {}
            if crf is not None:
                options["cq" if codec.endswith("_nvenc") else "crf"] = str(crf)
            if preset and codec in ("libx264", "libx265"):
                options["preset"] = preset
            if codec == "libx265":
                options["x265-params"] = "log-level=error"
            if preset and codec == "libsvtav1":
                options["preset"] = preset if preset.isdigit() else "10"
            if codec == "libvpx-vp9":
                options.update({"deadline": "realtime", "cpu-used": "8", "b": "0"})
            self.stream.options = options
            self.audio = None
            if audio_template is not None:
                try:
                    self.audio = self.container.add_stream_from_template(audio_template)
                except (av.FFmpegError, ValueError, TypeError):
                    self.audio = None  # this container cannot hold that audio codec
            self.frames = 0
        except Exception:
            self.container.close()
            raise

    def write(self, frame: av.VideoFrame) -> None:
        """Encode one frame (its pts and time base are kept).

        The bytes past each plane's width (up to its line size) are set to 0
        first: libx264 reads them (zeroing them changed a 432x240 crf 0
        stream's bytes), and a decoded frame's padding holds whatever its
        pooled buffer held before, so the stream depended on it (as the
        benchmark's inputs did, see `synth._zero_padding`).
        """
        if any(p.line_size > p.width for p in frame.planes):
            frame.make_writable()
            for plane in frame.planes:
                if plane.line_size > plane.width:
                    rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
                    rows[:, plane.width :] = 0
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def write_audio(self, packet: av.Packet) -> None:
        """Remux one audio packet from the input."""
        if self.audio is None:
            return
        packet.stream = self.audio
        self.container.mux(packet)

    def close(self, *, flush: bool = True) -> None:
        """Flush the encoder (unless aborting) and close the file."""
        try:
            if flush:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
