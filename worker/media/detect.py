"""Find marks with no template: structure that holds still while the scene does not.

The detect pass (`DetectPass`) sees every frame once, downscaled so the long
side is at most `DETECT_SIDE` pixels. Frames are grouped in short windows of
consecutive frames (`window` frames, windows spread over the video, at most
`max_windows` of them); per window it keeps one map:

    P_w = | median over the window's frames of (grad J . m_w) |

where `m_w` is the direction of the scene's own motion in that window (phase
correlation between consecutive frames). A mark is static while it sits at a
spot, so its gradient survives the median; moving content does not, and the
projection on the motion direction also removes edges that slide along
themselves (a horizontal edge in a horizontal pan), which a plain median keeps.
With a still camera (no motion) the full gradient is used.

Then (`find_spots`):

- `Q = min_w P_w` is structure present in *every* window: a mark that never
  moves (over a moving scene), or, with a still camera, the scene itself;
- `T_w = P_w - Q` is structure present in window w but not in some other:
  a mark that jumps, appears or vanishes.

Connected parts of the thresholded maps are candidate boxes; boxes of
different windows that overlap are one *spot* with the set of windows where
it is active. Candidates are only that: `worker/media/auto.py` decides
whether each is a blended mark (`J = (1-a) I + a W`) before anything is
touched.

On CUDA the per-window median and gradients run on the device in one batch
per window; on the CPU the same code runs with torch's single thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: the detection maps' long side (pixels): 720p is analysed at 427x240
DETECT_SIDE = 480
#: a window's mean motion below this (px/frame, detection scale) counts as still
STILL_SPEED = 0.3
#: ... and the scene as still when a window's median change is below this (grey levels)
STILL_CHANGE = 4.0
#: structure thresholds: at least this (Sobel units) and this many times the map's median
MIN_STRUCTURE = 40.0
STRUCTURE_OVER_MEDIAN = 8.0
#: a window's transient structure is at most this share of its pixels
SPARSE = 0.04
#: a candidate box covers at most this fraction of the frame's side
MAX_BOX_FRACTION = 0.6
#: at most this many candidate spots are analysed (the strongest)
MAX_SPOTS = 12

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
#: the kernels `gradients` applies (x, then y), kept for tests
SOBEL = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None]


def gradients(frames: torch.Tensor) -> torch.Tensor:
    """Sobel gradients (B, 2, h, w) of luma frames (B, h, w) float, replicated borders.

    Separable, by slicing (a 2-channel 3x3 conv2d is far slower on the CPU).
    """
    p = F.pad(frames[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    sy = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # smoothed along y: (B, h, w + 2)
    sx = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # smoothed along x: (B, h + 2, w)
    gx = sy[:, :, 2:] - sy[:, :, :-2]
    gy = sx[:, 2:] - sx[:, :-2]
    return torch.stack([gx, gy], 1)


def median0(t: torch.Tensor) -> torch.Tensor:
    """`t.median(0).values` (the lower middle for an even count), by partial sort on the CPU.

    numpy's partition is ~5x faster than torch's median over a stack of frames.
    """
    if t.device.type != "cpu":
        return t.median(0).values
    k = (t.shape[0] - 1) // 2
    return torch.from_numpy(np.partition(t.contiguous().numpy(), k, axis=0)[k])


@dataclass
class Spot:
    """A candidate: a box (full resolution) and the windows in which it is active."""

    x: int
    y: int
    w: int
    h: int
    windows: set[int]
    #: the windows where it shows at least half its strongest strength (not cut by a jump)
    strong: set[int]
    #: present in every window (a mark that never moves, or static scene content)
    persistent: bool
    strength: float

    def box(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


@dataclass
class Detection:
    """What the detect pass kept: one structure map per window, and where windows are."""

    factor: int
    width: int
    height: int
    #: first frame of each window and its length
    starts: list[int] = field(default_factory=list)
    length: int = 8
    #: mean motion (dy, dx) per window in detection pixels per frame
    motion: list[tuple[float, float]] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    #: per window, the median over pixels of |last frame - first frame| (grey levels)
    change: list[float] = field(default_factory=list)
    #: the scene's global shift (dy, dx) from frame t-1 to t, full-resolution pixels,
    #: for the frames of the windows (phase correlation)
    shifts: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def moving(self) -> bool:
        """Whether the scene moves in most windows (the camera, or most of the content)."""
        speeds = [math.hypot(*m) for m in self.motion]
        if not speeds:
            return False
        return (
            float(np.median(speeds)) > STILL_SPEED or float(np.median(self.change)) > STILL_CHANGE
        )

    def window_of(self, frame: int) -> int | None:
        """The window holding `frame`, if any."""
        for i, s in enumerate(self.starts):
            if s <= frame < s + self.length:
                return i
        return None

    def nearest_window(self, frame: int) -> int:
        """The window whose middle is closest to `frame`."""
        mids = [s + self.length / 2 for s in self.starts]
        return min(range(len(mids)), key=lambda i: abs(mids[i] - frame))


class DetectPass:
    """Streaming accumulator: feed every frame's luma plane; `finish()` gives a `Detection`."""

    def __init__(
        self,
        width: int,
        height: int,
        total: int,
        *,
        device: torch.device,
        window: int = 8,
        max_windows: int = 96,
    ) -> None:
        self.device = device
        self.factor = max(1, math.ceil(max(width, height) / DETECT_SIDE))
        self.sw, self.sh = width // self.factor, height // self.factor
        length = max(3, min(window, total // 4 or 3))
        count = max(1, min(max_windows, total // length))
        step = max(length, total // count)
        self.det = Detection(self.factor, width, height, length=length)
        self.det.starts = [i * step for i in range(count) if i * step + length <= total] or [0]
        self._next = 0  # index into starts of the window being filled
        self._buf: list[np.ndarray] = []
        self._hann = cv2.createHanningWindow((self.sw, self.sh), cv2.CV_32F)

    def _small(self, y: np.ndarray) -> np.ndarray:
        if self.factor == 1:
            return y.astype(np.float32)
        # cropped to a whole multiple of the factor first: OpenCV's INTER_AREA has a
        # fast path for integer factors (1280x720 -> 426x240: 0.19 ms, not 0.70)
        f = self.factor
        whole = y[: self.sh * f, : self.sw * f]
        return cv2.resize(whole, (self.sw, self.sh), interpolation=cv2.INTER_AREA).astype(
            np.float32
        )

    def add(self, index: int, luma: np.ndarray) -> None:
        """Frame `index`'s luma plane (h, w) uint8 (a view is fine: it is copied small)."""
        if self._next >= len(self.det.starts):
            return
        start = self.det.starts[self._next]
        if index < start:
            return
        self._buf.append(self._small(luma))
        if len(self._buf) == self.det.length:
            self._close()

    def _close(self) -> None:
        buf = self._buf
        self._buf = []
        self._next += 1
        # cv2.phaseCorrelate may scribble on its inputs: give it copies.
        shifts = [
            cv2.phaseCorrelate(buf[i - 1].copy(), buf[i].copy(), self._hann)[0]
            for i in range(1, len(buf))
        ]
        dx, dy = (float(np.mean([s[k] for s in shifts])) for k in (0, 1))
        self.det.motion.append((dy, dx))
        first = self.det.starts[self._next - 1]
        for k, (sx, sy) in enumerate(shifts):
            self.det.shifts[first + k + 1] = (sy * self.factor, sx * self.factor)
        self.det.change.append(float(np.median(np.abs(buf[-1] - buf[0]))))
        frames = torch.from_numpy(np.stack(buf)).to(self.device)
        g = gradients(frames)
        speed = math.hypot(dx, dy)
        if speed > STILL_SPEED:
            d = torch.tensor([dx / speed, dy / speed], device=self.device).view(1, 2, 1, 1)
            p = median0((g * d).sum(1)).abs()
        else:
            p = median0(g).norm(dim=0)
        self.det.maps.append(p.to(torch.float16).cpu())

    def finish(self) -> Detection:
        """The maps of every complete window (a window cut short by the end is dropped)."""
        det = self.det
        det.starts = det.starts[: len(det.maps)]
        return det


def _threshold(m: torch.Tensor) -> float:
    return max(MIN_STRUCTURE, STRUCTURE_OVER_MEDIAN * float(m.float().median()))


def _boxes(mask: np.ndarray, join: int) -> list[tuple[int, int, int, int, int]]:
    """(x, y, w, h, area) of the parts of `mask`, near parts joined (`join` px)."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * join + 1, 2 * join + 1), np.uint8))
    n, labels = cv2.connectedComponents(grown)
    # The mask's own pixels per part, all parts at once (a full-frame pass per
    # part was most of find_spots' time on a busy frame).
    ys, xs = np.nonzero(mask)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n)
    big = 1 << 30
    x0, y0 = np.full(n, big), np.full(n, big)
    x1, y1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs)
    np.maximum.at(y1, lab, ys)
    return [
        (int(x0[i]), int(y0[i]), int(x1[i] - x0[i] + 1), int(y1[i] - y0[i] + 1), int(area[i]))
        for i in range(1, n)
        if area[i] >= 12
    ]


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box: a part of a mark overlaps the whole mark fully."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / max(min(aw * ah, bw * bh), 1)


def _union(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0)


def find_spots(det: Detection) -> tuple[list[Spot], list[dict]]:
    """Candidate spots from the window maps, strongest first; and what was set aside."""
    rejected: list[dict] = []
    if not det.maps:
        return [], rejected
    # One window at a time in float32 (the maps stay float16): the peak does
    # not grow with the number of windows beyond the maps themselves.
    q = det.maps[0].float()
    for m in det.maps[1:]:
        q = torch.minimum(q, m.float())
    f = det.factor
    sh, sw = q.shape
    join = max(2, round(6 / f * max(1.0, sh / 240)))
    raw: list[tuple[tuple[int, int, int, int], int, float, bool]] = []

    def transient(wi: int) -> torch.Tensor:
        # Smoothed a little: a mark's strokes are lines, the scene's leftovers
        # (fine grain, edges that moved less than a pixel) mostly specks.
        return F.avg_pool2d((det.maps[wi].float() - q)[None, None], 3, 1, 1)[0, 0]

    if len(det.maps) >= 2:
        # the threshold from the median over every window (on a subsample of pixels)
        thr = _threshold(torch.cat([transient(wi).flatten()[::7] for wi in range(len(det.maps))]))
        for wi in range(len(det.maps)):
            t = transient(wi).numpy()
            # a busy window (a slow pan over fine detail) keeps only its strongest
            # structure: at most the top SPARSE share of its pixels
            thr_w = max(thr, float(np.quantile(t, 1 - SPARSE)))
            for x, y, w, h, _area in _boxes(t > thr_w, join):
                raw.append(((x, y, w, h), wi, float(t[y : y + h, x : x + w].sum()), False))
    if det.moving or len(det.maps) < 2:
        qn = q.numpy()
        for x, y, w, h, _area in _boxes(qn > _threshold(q), join):
            raw.append(((x, y, w, h), -1, float(qn[y : y + h, x : x + w].sum()), True))
    elif float(q.float().median()) > 0:
        rejected.append(
            {
                "reason": "still camera: structure present in every window is scene content "
                "(a mark that never moves or vanishes cannot be told from it)",
            }
        )
    # Group the boxes of all windows into spots: each box joins the first group
    # (same kind) whose box it overlaps by more than half (`overlap`, on arrays:
    # a busy clip has thousands of boxes and hundreds of groups).
    groups: list[dict] = []
    g_box = np.zeros((len(raw), 4), np.int64)
    g_persistent = np.zeros(len(raw), bool)
    for box, wi, strength, persistent in sorted(raw, key=lambda r: -r[2]):
        n = len(groups)
        gx, gy, gw, gh = g_box[:n].T
        bx, by, bw, bh = box
        ix = np.maximum(0, np.minimum(gx + gw, bx + bw) - np.maximum(gx, bx))
        iy = np.maximum(0, np.minimum(gy + gh, by + bh) - np.maximum(gy, by))
        share = ix * iy / np.maximum(np.minimum(gw * gh, bw * bh), 1)
        hit = np.flatnonzero((g_persistent[:n] == persistent) & (share > 0.5))
        if len(hit):
            g = groups[int(hit[0])]
            g["windows"].add(wi)
            g["per_window"][wi] = g["per_window"].get(wi, 0.0) + strength
            g["strength"] += strength
            # the strongest window's box stands (a union would swallow the neighbours)
            continue
        g_box[n], g_persistent[n] = box, persistent
        groups.append(
            {
                "box": box,
                "windows": {wi},
                "per_window": {wi: strength},
                "strength": strength,
                "persistent": persistent,
            }
        )
    spots: list[Spot] = []
    for g in sorted(groups, key=lambda g: -g["strength"]):
        x0, y0, bw, bh = g["box"]
        x1, y1 = x0 + bw, y0 + bh
        box = {"x": x0 * f, "y": y0 * f, "w": (x1 - x0) * f, "h": (y1 - y0) * f}
        if (x1 - x0) > MAX_BOX_FRACTION * sw or (y1 - y0) > MAX_BOX_FRACTION * sh:
            rejected.append({**box, "reason": "larger than a mark could be"})
            continue
        if len(spots) >= MAX_SPOTS:
            rejected.append({**box, "reason": f"beyond the {MAX_SPOTS} strongest candidates"})
            continue
        windows = set(range(len(det.maps))) if g["persistent"] else g["windows"] - {-1}
        top = max(g["per_window"].values())
        strong = {wi for wi, v in g["per_window"].items() if v >= 0.5 * top} - {-1}
        spots.append(
            Spot(
                x=box["x"],
                y=box["y"],
                w=box["w"],
                h=box["h"],
                windows=windows,
                strong=strong or windows,
                persistent=g["persistent"],
                strength=round(g["strength"], 1),
            )
        )
    return spots, rejected
