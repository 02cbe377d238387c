"""Tiny models and media for the blob and model.infer tests, made in the test (no downloads)."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import torch


class TinyNet(torch.nn.Module):
    """NCHW float image -> 4 logits: a conv and a global mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class TinyPair(torch.nn.Module):
    """Returns a tuple: logits and a per-image mean brightness (two named outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x.mean(dim=(1, 2, 3)).unsqueeze(1)


class MeanColour(torch.nn.Module):
    """NHWC uint8 pixels -> per-image mean of each channel (checks layout and dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise ValueError("expected uint8 input")
        return x.float().mean(dim=(1, 2))


def make_images(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """PNG images of the given (height, width) with distinct gradients."""
    paths = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 7 + i * 40) % 256, (yy * 5) % 256, np.full_like(xx, 30 * i)], -1)
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), img.astype(np.uint8))
        paths.append(path)
    return paths


def make_video(path: Path, frames: int = 12, size: tuple[int, int] = (24, 32)) -> Path:
    """A small H.264 clip of a moving gradient, `frames` frames of (height, width)."""
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for n in range(frames):
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([(xx * 8 + n * 10) % 256, (yy * 8) % 256, np.full_like(xx, 128)], -1)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
