"""`model.infer`: run a user-uploaded torch model over images or video frames, in batches.

Inputs: input 0 is the model — a ``torch.export`` archive (``.pt2``, loaded with
``torch.export.load``) or TorchScript (``torch.jit.load``); inputs 1… are images
and/or videos. Params (the manifest) say how pixels become the model's input::

    {"layout": "NCHW", "dtype": "float32", "channels": "RGB",
     "scale": 0.00392156862745098, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "resize": "letterbox", "size": [224, 224], "batch_size": 16, "output": "npy"}

Frames are decoded one at a time (PyAV for video, never the whole clip in
memory), resized on the CPU, batched as uint8 and converted on the device.
Outputs are ``<name>-00000.npy`` shards plus ``index.jsonl`` (which item is which
row), or one ``predictions.jsonl``. Loaded models are cached per process by
sha256 within a memory budget (LRU by file size), so a worker running many jobs
with one model loads it once.

A model file is code: it is accepted only as an uploaded blob (from an
authenticated tenant) or an allowed local file, never from a URL, and is loaded
inside the handler's process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from worker.sdk import Handler, JobContext, PermanentError

#: bytes of model files kept loaded per worker process (LRU by file size)
MODEL_CACHE_BYTES = int(os.environ.get("SPOOL_MODEL_CACHE_BYTES", str(4 * 1024**3)))
#: a npy shard is written once it holds this many bytes (or `shard_items` items)
SHARD_BYTES = 64 * 1024 * 1024
#: images above this many pixels are refused (decompression bombs)
MAX_IMAGE_PIXELS = 100_000_000

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg", ".gif"}


class InferParams(BaseModel):
    """The manifest of a `model.infer` job."""

    model_config = {"extra": "forbid"}

    #: model file format; auto sniffs the archive
    format: Literal["auto", "export", "torchscript"] = "auto"
    #: tensor layout the model takes
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    #: input dtype; float16 is used on CUDA only (float32 elsewhere); uint8 = raw pixels
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    #: channel order of the input tensor
    channels: Literal["RGB", "BGR", "GRAY"] = "RGB"
    #: pixels are multiplied by this first (float dtypes)
    scale: float = 1.0 / 255.0
    #: then (x - mean) / std per channel (one value or one per channel)
    mean: list[float] | None = None
    std: list[float] | None = None
    #: none keeps each image's size (batches split when the size changes)
    resize: Literal["none", "stretch", "letterbox"] = "none"
    #: [height, width] for stretch/letterbox
    size: tuple[int, int] | None = None
    #: letterbox padding value (0..255)
    pad_value: int = Field(default=114, ge=0, le=255)
    batch_size: int = Field(default=8, ge=1, le=1024)
    #: npy shards (+ index.jsonl) or predictions.jsonl
    output: Literal["npy", "jsonl"] = "npy"
    #: at most this many items per npy shard
    shard_items: int = Field(default=4096, ge=1, le=1_000_000)
    #: video: use every k-th frame
    frame_step: int = Field(default=1, ge=1, le=100_000)
    #: stop after this many items (0 = all)
    max_items: int = Field(default=0, ge=0)
    #: jsonl: report the k largest values (and indices) of each output row instead of all
    top_k: int = Field(default=0, ge=0, le=1000)

    @model_validator(mode="after")
    def _check(self) -> InferParams:
        if self.resize != "none":
            if self.size is None:
                raise ValueError(f"size [height, width] is required with resize={self.resize}")
            if not all(1 <= s <= 8192 for s in self.size):
                raise ValueError("size values must be between 1 and 8192")
        nch = 1 if self.channels == "GRAY" else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, nch):
                raise ValueError(f"{name} needs 1 or {nch} values for channels={self.channels}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self


class _ModelCache:
    """Loaded models by key, evicted least-recently-used past a byte budget (file sizes)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: tuple, model: Any, size: int) -> None:
        if size > self.budget:
            return  # too big to keep: used for this job only
        with self._lock:
            self._items[key] = (model, size)
            self._items.move_to_end(key)
            while sum(s for _, s in self._items.values()) > self.budget:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


MODEL_CACHE = _ModelCache(MODEL_CACHE_BYTES)


def _sniff_format(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        raise PermanentError(
            "input 0 is not a model: not a torch.export (.pt2) or TorchScript archive",
            code="BAD_MODEL",
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith("/archive_format") for n in names):
        return "export"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    raise PermanentError(
        "input 0 is a zip archive but neither a torch.export (.pt2) nor a TorchScript model",
        code="BAD_MODEL",
    )


def _load_model(path: Path, fmt: str, device: str) -> Any:
    try:
        if fmt == "export":
            # torch.export.load wants a .pt2 name or a buffer; blobs may have neither.
            with open(path, "rb") as f:
                program = torch.export.load(io.BytesIO(f.read()))
            return program.module().to(device)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but still what many users have.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
        return module.eval()
    except PermanentError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise PermanentError(
            f"input 0 could not be loaded as a {fmt} model: {type(exc).__name__}: {first}",
            code="BAD_MODEL",
        ) from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _media_kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    with open(path, "rb") as f:
        head = f.read(16)
    # Sniff common image signatures; anything else is handed to the video decoder.
    is_avi = head.startswith(b"RIFF") and b"AVI" in head
    image_magic = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
    return "image" if head.startswith(image_magic) and not is_avi else "video"


class _Source:
    """One data input: an image or a video, iterated as (meta, HxWx3 RGB uint8) items."""

    def __init__(self, index: int, path: Path, frame_step: int) -> None:
        self.index = index
        self.path = path
        self.kind = _media_kind(path)
        self.frame_step = frame_step

    def count(self) -> int:
        """Items this source will yield (estimated from the header for videos)."""
        if self.kind == "image":
            return 1
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise PermanentError(
                        f"input {self.index} has no video stream", code="INVALID_INPUT"
                    )
                stream = container.streams.video[0]
                frames = stream.frames
                if not frames and stream.duration and stream.average_rate:
                    frames = int(stream.duration * stream.time_base * stream.average_rate)
                return max(1, -(-int(frames or 0) // self.frame_step)) if frames else 0
        except av.FFmpegError as exc:
            raise PermanentError(
                f"input {self.index} is neither an image nor a readable video: {exc}",
                code="INVALID_INPUT",
            ) from None

    def items(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """Yield (meta, RGB frame) one at a time."""
        name = self.path.name
        if self.kind == "image":
            if self.path.stat().st_size == 0:
                raise PermanentError(f"input {self.index} ({name}) is empty", code="INVALID_INPUT")
            img = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
            if img is None:
                raise PermanentError(
                    f"input {self.index} ({name}) is not a readable image", code="INVALID_INPUT"
                )
            if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
                raise PermanentError(f"input {self.index} is too large", code="INVALID_INPUT")
            yield {"source": self.index, "name": name}, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            return
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for n, frame in enumerate(container.decode(stream)):
                    if n % self.frame_step:
                        continue
                    pts = float(frame.pts * frame.time_base) if frame.pts is not None else None
                    meta = {"source": self.index, "name": name, "frame": n, "pts_s": pts}
                    yield meta, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise PermanentError(
                f"input {self.index} ({name}) could not be decoded: {exc}", code="INVALID_INPUT"
            ) from None


def _prepare(img: np.ndarray, p: InferParams) -> np.ndarray:
    """Channel order and resize on the CPU; returns HxWxC uint8."""
    if p.channels == "BGR":
        img = img[:, :, ::-1]
    elif p.channels == "GRAY":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    if p.resize == "none":
        return np.ascontiguousarray(img)
    th, tw = p.size  # type: ignore[misc]
    h, w = img.shape[:2]
    if p.resize == "stretch":
        out = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        return out.reshape(th, tw, -1)
    r = min(th / h, tw / w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA).reshape(nh, nw, -1)
    canvas = np.full((th, tw, resized.shape[2]), p.pad_value, dtype=np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas


def _named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
        return {f"output{i}": t for i, t in enumerate(out)}
    if isinstance(out, dict) and all(isinstance(t, torch.Tensor) for t in out.values()):
        return {
            "".join(c if c.isalnum() else "_" for c in str(k)) or "out": t for k, t in out.items()
        }
    raise PermanentError(
        f"the model returned {type(out).__name__}; expected a tensor, a tuple/list or a dict "
        "of tensors",
        code="MODEL_OUTPUT",
    )


class _Writer:
    """Writes per-item outputs as npy shards + index.jsonl, or predictions.jsonl."""

    def __init__(self, ctx: JobContext, p: InferParams) -> None:
        self.ctx = ctx
        self.p = p
        self.files: list[str] = []
        self.shapes: dict[str, list[int]] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_items = 0
        self._pending_bytes = 0
        self._shard = 0
        name = "index.jsonl" if p.output == "npy" else "predictions.jsonl"
        self.files.append(name)
        self._lines = open(ctx.output_path(name), "w", encoding="utf-8")  # noqa: SIM115

    def add(self, metas: list[dict[str, Any]], outs: dict[str, np.ndarray]) -> None:
        for name, arr in outs.items():
            self.shapes.setdefault(name, list(arr.shape[1:]))
        if self.p.output == "jsonl":
            for i, meta in enumerate(metas):
                rec = dict(meta)
                rec["outputs"] = {n: self._row(a[i]) for n, a in outs.items()}
                self._lines.write(json.dumps(rec) + "\n")
            return
        for i, meta in enumerate(metas):
            rec = dict(meta)
            rec.update(shard=self._shard, row=self._pending_items + i)
            self._lines.write(json.dumps(rec) + "\n")
        for name, arr in outs.items():
            self._pending.setdefault(name, []).append(arr)
            self._pending_bytes += arr.nbytes
        self._pending_items += len(metas)
        if self._pending_items >= self.p.shard_items or self._pending_bytes >= SHARD_BYTES:
            self._flush()

    def _row(self, row: np.ndarray) -> Any:
        if self.p.top_k and row.ndim >= 1 and row.size:
            flat = row.reshape(-1)
            k = min(self.p.top_k, flat.size)
            idx = np.argsort(-flat, kind="stable")[:k]
            return {"indices": idx.tolist(), "values": flat[idx].tolist()}
        return row.tolist()

    def _flush(self) -> None:
        if not self._pending_items:
            return
        for name, parts in self._pending.items():
            fname = f"{name}-{self._shard:05d}.npy"
            np.save(self.ctx.output_path(fname), np.concatenate(parts, axis=0))
            self.files.append(fname)
        self._pending.clear()
        self._pending_items = self._pending_bytes = 0
        self._shard += 1

    def close(self) -> None:
        self._flush()
        self._lines.close()


class _Batches:
    """Collects prepared items and runs the model once a batch is full."""

    def __init__(
        self, ctx: JobContext, model: Any, writer: _Writer, p: InferParams, use_half: bool
    ) -> None:
        self.ctx, self.model, self.writer, self.p = ctx, model, writer, p
        self.use_half = use_half
        self.total = 0
        self.done = 0
        self.batches = 0
        self._items: list[np.ndarray] = []
        self._metas: list[dict[str, Any]] = []

    @property
    def pending(self) -> int:
        return len(self._items)

    def add(self, meta: dict[str, Any], arr: np.ndarray) -> None:
        # Items of another size cannot share a tensor: run what we have first.
        if self._items and arr.shape != self._items[0].shape:
            self.flush()
        self._items.append(arr)
        self._metas.append(meta)
        if len(self._items) >= self.p.batch_size:
            self.flush()

    def flush(self) -> None:
        """Run the pending items through the model, write outputs, report progress."""
        if not self._items:
            return
        self.ctx.check_cancelled()
        p, device, n = self.p, self.ctx.device, len(self._items)
        # uint8 crosses to the device; the float conversion happens there.
        x = torch.from_numpy(np.stack(self._items)).to(device, non_blocking=True)
        if p.dtype != "uint8":
            x = x.to(torch.float16 if self.use_half else torch.float32) * p.scale
            if p.mean is not None:
                x = x - torch.tensor(p.mean, dtype=x.dtype, device=device)
            if p.std is not None:
                x = x / torch.tensor(p.std, dtype=x.dtype, device=device)
        if p.layout == "NCHW":
            x = x.permute(0, 3, 1, 2)
        x = x.contiguous()
        try:
            with torch.inference_mode():
                outs = _named_outputs(self.model(x))
        except PermanentError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise PermanentError(
                f"the model failed on a batch of shape {list(x.shape)} ({x.dtype}): "
                f"{type(exc).__name__}: {first}",
                code="MODEL_ERROR",
            ) from None
        arrays = {}
        for name, t in outs.items():
            if t.ndim == 0 or t.shape[0] != n:
                raise PermanentError(
                    f"model output {name!r} has shape {list(t.shape)}; expected the batch "
                    f"size {n} first",
                    code="MODEL_OUTPUT",
                )
            t = t.detach()
            if t.dtype in (torch.float16, torch.bfloat16):
                t = t.float()
            arrays[name] = t.cpu().numpy()
        self.writer.add(self._metas, arrays)
        self._items.clear()
        self._metas.clear()
        self.done += n
        self.batches += 1
        self.ctx.progress(
            done=self.done, total=max(self.total, self.done), unit="items", stage="infer"
        )


class ModelInfer(Handler):
    """Run an uploaded torch.export / TorchScript model over images or video frames."""

    name = "model.infer"
    Params = InferParams
    max_attempts = 2

    def run(self, ctx: JobContext, params: InferParams) -> dict[str, Any]:
        """Load (or reuse) the model, stream every item through it, write the outputs."""
        if len(ctx.inputs) < 2:
            raise PermanentError(
                "model.infer needs input 0 = the model and inputs 1… = images or videos",
                code="INVALID_INPUT",
            )
        if ctx.inputs[0].lower().startswith(("http://", "https://")):
            # A model is code: only uploaded blobs (an authenticated tenant) or allowed files.
            raise PermanentError(
                "the model must be an uploaded blob (blob:sha256:…), not a URL",
                code="INVALID_INPUT",
            )
        use_half = params.dtype == "float16" and ctx.device.startswith("cuda")
        model, info = self._model(ctx, params, use_half)
        sources = [
            _Source(i, ctx.input_path(i), params.frame_step) for i in range(1, len(ctx.inputs))
        ]
        total = sum(s.count() for s in sources)
        if params.max_items:
            total = min(total, params.max_items) if total else params.max_items
        writer = _Writer(ctx, params)
        runner = _Batches(ctx, model, writer, params, use_half)
        runner.total = total
        started = time.monotonic()
        ctx.progress(done=0, total=total, unit="items", stage="infer")
        try:
            for source in sources:
                for meta, img in source.items():
                    runner.add(meta, _prepare(img, params))
                    if params.max_items and runner.done + runner.pending >= params.max_items:
                        break
                if params.max_items and runner.done + runner.pending >= params.max_items:
                    break
            runner.flush()
        finally:
            writer.close()
        if runner.done == 0:
            raise PermanentError("the inputs held no images or frames", code="INVALID_INPUT")
        ctx.progress(done=runner.done, total=runner.done, unit="items", stage="infer")
        elapsed = max(time.monotonic() - started, 1e-9)
        return {
            "items": runner.done,
            "batches": runner.batches,
            "items_per_s": round(runner.done / elapsed, 2),
            "model_sha256": info["sha256"],
            "model_format": info["format"],
            "model_cached": info["cached"],
            "device": ctx.device,
            "dtype": "float16" if use_half else params.dtype.replace("float16", "float32"),
            "outputs": writer.shapes,
            "files": writer.files,
        }

    def _model(self, ctx: JobContext, p: InferParams, use_half: bool) -> tuple[Any, dict[str, Any]]:
        path = ctx.input_path(0)
        uri = ctx.inputs[0]
        sha = uri.removeprefix("blob:sha256:").lower() if uri.startswith("blob:sha256:") else ""
        sha = sha or _file_sha256(path)
        fmt = p.format if p.format != "auto" else _sniff_format(path)
        key = (sha, fmt, ctx.device, use_half)
        model = MODEL_CACHE.get(key)
        cached = model is not None
        if model is None:
            ctx.progress(fraction=0.0, stage="load_model", message=f"loading {fmt} model")
            model = _load_model(path, fmt, ctx.device)
            if use_half:
                model = model.half()
            MODEL_CACHE.put(key, model, path.stat().st_size)
        return model, {"sha256": sha, "format": fmt, "cached": cached}
