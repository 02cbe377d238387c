"""Harder ground truth: textured scenes, moving and coming-and-going marks, clean clips.

`worker/media/synth.py` draws smooth sinusoidal clips with one mark; this
module builds what a watermark remover meets in the wild (issue 10):

- scenes with hard edges and real texture (`scene_frames`): a canvas of
  multi-scale noise, opaque rectangles and discs with sharp borders, stripes
  and dark and light text, seen by a *still* camera (sensor noise, a slow
  exposure drift, a disc moving across) or a *moving* one (the view pans over
  the canvas at a varying, sub-pixel speed);
- marks (`MarkTrack`) that stay, jump between 2-4 spots at irregular
  intervals (revisiting them in any order), appear late or vanish, several
  at once; white and coloured; opacity 0.25-0.6;
- clips with no mark at all, including a static opaque UI-like badge (scene
  content that does not move, not a blended mark).

`CASES` names the set bench/quality.py and tests/media evaluate; `make_clip`
renders one case at any size (the marks scale with the frame).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from worker.media import synth

WHITE = (240, 240, 235)


# -- scenes -------------------------------------------------------------------
def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multi-octave value noise in about [-1, 1], (h, w, 3): 'real' texture, not a sinusoid."""
    out = np.zeros((h, w, 3), np.float32)
    amp, total = 1.0, 0.0
    for cell in (64, 24, 8, 3):
        small = rng.standard_normal((max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        out += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.6
    return out / total


def make_canvas(h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """A textured RGB canvas (uint8) with hard-edged shapes, stripes and text."""
    rng = np.random.default_rng(seed)
    base = np.array(rng.uniform(60, 170, 3), np.float32)
    img = base + 45 * _noise(rng, h, w)
    scale = max(h, w) / 640
    for _ in range(int(30 * (h * w) / (640 * 360)) + 6):
        colour = tuple(float(c) for c in rng.uniform(10, 245, 3))
        x, y = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        s = int(rng.uniform(8, 70) * scale) + 2
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + s, y + int(s * rng.uniform(0.3, 1.5))), colour, -1)
        else:
            cv2.circle(img, (x, y), s // 2, colour, -1)
    # stripes: a periodic hard-edged pattern (a fence, a shirt)
    x0, y0 = int(rng.uniform(0, w * 0.6)), int(rng.uniform(0, h * 0.6))
    period = max(4, int(10 * scale))
    for k in range(8):
        xs = x0 + k * period
        cv2.rectangle(img, (xs, y0), (xs + period // 2, y0 + int(60 * scale)), (25, 25, 30), -1)
    # text in the scene: signs, captions; dark and light, several sizes
    img = np.clip(img, 0, 255).astype(np.uint8)
    words = ("OPEN", "EXIT 12", "Cafe", "SALE 50%", "No. 7", "Hotel", "BUS")
    for _ in range(int(8 * (h * w) / (640 * 360)) + 3):
        word = words[int(rng.integers(len(words)))]
        colour = (245, 245, 240) if rng.random() < 0.5 else (15, 15, 20)
        fs = rng.uniform(0.5, 1.4) * scale
        pos = (int(rng.uniform(0, w * 0.85)), int(rng.uniform(h * 0.1, h)))
        cv2.putText(img, word, pos, cv2.FONT_HERSHEY_DUPLEX, fs, colour, max(1, int(2 * scale)))
    # a little fine grain everywhere so flat shapes are not perfectly flat
    grain = 4 * rng.standard_normal((h, w, 3)).astype(np.float32)
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def scene_frames(
    n: int, height: int, width: int, *, camera: str = "moving", seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield `n` RGB frames of a textured scene seen by a `still` or `moving` camera.

    still: the same view with sensor noise (sigma 1.5), a slow exposure drift
    and a disc crossing the frame (the only thing that moves). moving: the
    view pans over a larger canvas at 1.2-3.5 px/frame (up to 480 wide, in
    proportion above) with a wobble, resampled
    bilinearly (sub-pixel motion, like a real pan).
    """
    rng = np.random.default_rng(seed + 1000)
    if camera == "still":
        canvas = make_canvas(height, width, seed=seed).astype(np.float32)
        r = max(6, height // 14)
        for t in range(n):
            f = canvas * (1.0 + 0.03 * np.sin(2 * np.pi * t / max(n, 2)))
            cx = int(-r + (width + 2 * r) * t / max(n - 1, 1))
            cy = int(height * 0.55 + height * 0.1 * np.sin(t / 7))
            cv2.circle(f, (cx, cy), r, (200, 60, 50), -1)
            f += 1.5 * rng.standard_normal(f.shape).astype(np.float32)
            yield np.clip(f, 0, 255).round().astype(np.uint8)
        return
    if camera != "moving":
        raise ValueError(f"camera must be 'still' or 'moving', not {camera!r}")
    # px/frame at 320 wide; a pan covers the same share of a larger frame per frame
    speed = (1.2 + 2.3 * rng.random()) * max(1.0, width / 480)
    # the path: mostly left-to-right, drifting vertically, speed varying
    xs, ys = [0.0], [0.0]
    for t in range(1, n):
        v = speed * (0.7 + 0.6 * (0.5 + 0.5 * np.sin(t / 9.0)))
        xs.append(xs[-1] + v)
        ys.append(ys[-1] + 0.6 * speed * np.sin(t / 13.0))
    ymin = min(ys)
    ch = int(height + max(ys) - ymin) + 8
    cw = int(width + xs[-1]) + 8
    canvas = make_canvas(ch, cw, seed=seed)
    for x, y in zip(xs, ys, strict=True):
        m = np.float32([[1, 0, -x], [0, 1, -(y - ymin)]])
        yield cv2.warpAffine(canvas, m, (width, height), flags=cv2.INTER_LINEAR)


# -- marks ----------------------------------------------------------------------
def make_watermark(
    height: int, width: int, word: str = "GENAI", colour=WHITE, glyph: bool = True
) -> synth.Logo:
    """A generator-style watermark: a four-pointed glyph and a word (anti-aliased)."""
    s = 4
    hh, ww = height * s, width * s
    canvas = np.zeros((hh, ww), np.uint8)
    x = 0
    if glyph:
        c, r = (hh // 2, hh // 2), int(hh * 0.45)
        k = int(r * 0.28)
        pts = np.array(
            [
                *((c[0], c[1] - r), (c[0] + k, c[1] - k), (c[0] + r, c[1]), (c[0] + k, c[1] + k)),
                *((c[0], c[1] + r), (c[0] - k, c[1] + k), (c[0] - r, c[1]), (c[0] - k, c[1] - k)),
            ],
            np.int32,
        )
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA)
        x = hh + hh // 6
    thick = max(2, hh // 9)
    fs = hh / 34.0
    (tw, th), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
    fs *= min(1.0, (ww - x - thick) / max(tw, 1))
    (tw, th), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
    cv2.putText(
        canvas, word, (x, (hh + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, fs, 255, thick, cv2.LINE_AA
    )
    shape = cv2.resize(
        canvas.astype(np.float32) / 255, (width, height), interpolation=cv2.INTER_AREA
    )
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = np.asarray(colour, np.uint8)
    return synth.Logo(rgb=rgb, shape=np.clip(shape, 0, 1))


@dataclass
class MarkTrack:
    """One mark over a clip: its logo, opacity and top-left (y, x) per frame (None: absent)."""

    logo: synth.Logo
    opacity: float
    positions: list[tuple[int, int] | None]


def corner_spots(height: int, width: int, logo: synth.Logo, margin: int) -> list[tuple[int, int]]:
    """Top-left corners of the four corner placements (even), clockwise from top-left."""
    lh, lw = logo.size
    spots = [
        (margin, margin),
        (margin, width - lw - margin),
        (height - lh - margin, width - lw - margin),
        (height - lh - margin, margin),
    ]
    return [(y - y % 2, x - x % 2) for y, x in spots]


def jump_schedule(
    n: int, spots: list[tuple[int, int]], rng: np.random.Generator, run: tuple[int, int]
) -> list[tuple[int, int] | None]:
    """Stay `run[0]`-`run[1]` frames (irregular) at a spot, jump to another one; revisits."""
    out: list[tuple[int, int] | None] = []
    cur = int(rng.integers(len(spots)))
    while len(out) < n:
        out.extend([spots[cur]] * int(rng.integers(run[0], run[1] + 1)))
        cur = (cur + 1 + int(rng.integers(len(spots) - 1))) % len(spots)
    return out[:n]


@dataclass
class Clip:
    """A rendered case: clean and marked frames and the marks' ground truth."""

    name: str
    camera: str
    clean: list[np.ndarray]
    blended: list[np.ndarray]
    marks: list[MarkTrack]
    #: per frame, the union of the marks' alpha (float32, frame-sized)
    alphas: list[np.ndarray] = field(default_factory=list)

    @property
    def marked(self) -> bool:
        return any(p is not None for m in self.marks for p in m.positions)

    def truth_mask(self, t: int, threshold: float = 0.0) -> np.ndarray:
        """Pixels of frame t the marks cover (alpha above `threshold` x opacity)."""
        return self.alphas[t] > threshold


#: name -> (camera, description); see `make_clip` for what each holds
CASES: dict[str, tuple[str, str]] = {
    "still-jump4": ("still", "white glyph+word, 4 corners, irregular 10-30 frame runs, a=0.45"),
    "moving-jump3": ("moving", "white text logo, 3 spots, irregular runs, a=0.5"),
    "still-late-colour": ("still", "yellow mark appears at 30%, vanishes at 75%, a=0.6"),
    "moving-jump2-colour": ("moving", "cyan mark, 2 spots, irregular runs, a=0.35"),
    "moving-two": ("moving", "static corner logo a=0.3 + a jumping white mark a=0.4"),
    "moving-faint": ("moving", "white glyph+word, 3 spots, a=0.25"),
    "still-clean": ("still", "no mark: still camera, text and hard edges"),
    "moving-clean": ("moving", "no mark: moving camera"),
    "moving-clean-ui": ("moving", "no mark: an opaque static UI badge over a moving scene"),
}

MARKED_CASES = tuple(k for k in CASES if "clean" not in k)
CLEAN_CASES = tuple(k for k in CASES if "clean" in k)


def make_clip(name: str, n: int, height: int, width: int, *, seed: int = 0) -> Clip:
    """Render case `name` (a key of CASES): `n` frames of `width`x`height`."""
    camera = CASES[name][0]
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    clean = list(scene_frames(n, height, width, camera=camera, seed=seed))
    mh = max(12, height // 9)  # the mark's height scales with the frame
    margin = max(4, height // 30)
    run = (max(4, n // 8), max(6, n // 4))  # irregular stays, a few jumps per clip
    marks: list[MarkTrack] = []
    if name == "still-jump4":
        logo = make_watermark(mh, mh * 4, "GENAI")
        marks.append(
            MarkTrack(
                logo, 0.45, jump_schedule(n, corner_spots(height, width, logo, margin), rng, run)
            )
        )
    elif name == "moving-jump3":
        logo = synth.make_logo(mh, mh * 3, "SPOOL")
        spots = corner_spots(height, width, logo, margin)
        spots = [spots[0], spots[2], ((height - mh) // 2 & ~1, (width - mh * 3) // 2 & ~1)]
        marks.append(MarkTrack(logo, 0.5, jump_schedule(n, spots, rng, run)))
    elif name == "still-late-colour":
        logo = make_watermark(mh, mh * 4, "SORA", colour=(250, 210, 40))
        pos = corner_spots(height, width, logo, margin)[2]
        a, b = int(n * 0.3), int(n * 0.75)
        marks.append(MarkTrack(logo, 0.6, [pos if a <= t < b else None for t in range(n)]))
    elif name == "moving-jump2-colour":
        logo = make_watermark(mh, mh * 4, "VEO", colour=(60, 200, 250))
        spots = corner_spots(height, width, logo, margin)
        marks.append(MarkTrack(logo, 0.35, jump_schedule(n, [spots[1], spots[3]], rng, run)))
    elif name == "moving-two":
        corner = synth.make_logo(mh, mh * 3, "TV1")
        cy, cx = corner_spots(height, width, corner, margin)[1]
        marks.append(MarkTrack(corner, 0.3, [(cy, cx)] * n))
        logo = make_watermark(mh, mh * 4, "GENAI")
        spots = corner_spots(height, width, logo, margin)
        marks.append(
            MarkTrack(logo, 0.4, jump_schedule(n, [spots[0], spots[2], spots[3]], rng, run))
        )
    elif name == "moving-faint":
        logo = make_watermark(mh, mh * 4, "GENAI")
        spots = corner_spots(height, width, logo, margin)[:3]
        marks.append(MarkTrack(logo, 0.25, jump_schedule(n, spots, rng, run)))
    elif name == "moving-clean-ui":
        # Opaque content that never moves: a badge with a border and a label.
        bh, bw = mh, mh * 3
        y0, x0 = margin, width - bw - margin
        for f in clean:
            cv2.rectangle(f, (x0, y0), (x0 + bw, y0 + bh), (200, 30, 30), -1)
            cv2.rectangle(f, (x0, y0), (x0 + bw, y0 + bh), (255, 255, 255), max(1, mh // 12))
            fs = mh / 40
            cv2.putText(
                f,
                "LIVE",
                (x0 + bw // 6, y0 + bh * 3 // 4),
                cv2.FONT_HERSHEY_SIMPLEX,
                fs,
                (255, 255, 255),
                max(1, mh // 10),
                cv2.LINE_AA,
            )
    blended, alphas = [], []
    for t, f in enumerate(clean):
        out = f
        alpha = np.zeros((height, width), np.float32)
        for m in marks:
            out = synth.blend(out, m.logo, m.positions[t], m.opacity)
            alpha = np.maximum(
                alpha, synth.alpha_mask(height, width, m.logo, m.positions[t], m.opacity)
            )
        blended.append(out)
        alphas.append(alpha)
    return Clip(name, camera, clean, blended, marks, alphas)
