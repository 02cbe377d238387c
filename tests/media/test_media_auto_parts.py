"""Issue 10: the parts of `auto` that decide alone, checked without a whole job.

Cheap (no video job): the still-camera occlusion test, the fast CPU forms of
the median, high-pass and detection boxes against their plain references,
and the clean row padding that makes the benchmark's H.264 inputs reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from worker.media import synth
from worker.media.auto_blend import MAX_PARTIAL, _partial_share
from worker.media.auto_spots import highpass
from worker.media.detect import _boxes, median0


def _frames_with(mask_per_frame: list[np.ndarray], on: np.ndarray, off: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.where(m[None], on, off)) for m in mask_per_frame])


def test_a_blend_switches_all_at_once_an_occlusion_sweeps():
    rng = np.random.default_rng(0)
    h, w = 24, 60
    off = rng.uniform(40, 200, (3, h, w)).astype(np.float32)  # the scene
    on = 0.6 * off + 0.4 * np.float32([235, 128, 128])[:, None, None]  # a white mark over it
    on[:, :, :10] = off[:, :, :10]  # (the mark does not fill the crop)
    whole = np.ones((h, w), bool)
    # a mark that is there for 10 frames and gone for 8: every frame all or nothing
    blend = _frames_with([whole] * 10 + [~whole] * 8, on, off)
    assert _partial_share(blend, torch.from_numpy(on), torch.from_numpy(off)) == 0.0
    # something crossing in front: each frame of the "off" part covers a part of it
    xs = np.arange(w)[None, :].repeat(h, 0)
    sweep = [whole] * 10 + [xs >= 8 * k for k in range(1, 9)]
    crossed = _frames_with(sweep, on, off)
    assert _partial_share(crossed, torch.from_numpy(on), torch.from_numpy(off)) > MAX_PARTIAL


def test_median0_is_torch_median():
    torch.manual_seed(0)
    for k in (1, 2, 7, 8, 33):
        t = torch.randint(0, 255, (k, 3, 17, 9)).float()
        assert torch.equal(median0(t), t.median(0).values)


def test_highpass_is_the_local_mean_over_the_window_inside_the_crop():
    torch.manual_seed(1)
    y = torch.rand(5, 31, 47) * 255
    ref = y - F.avg_pool2d(y[:, None], 7, 1, 3, count_include_pad=False)[:, 0]
    assert float((highpass(y) - ref).abs().max()) < 1e-3


def test_detection_boxes_are_the_parts_of_the_mask():
    rng = np.random.default_rng(2)
    mask = rng.random((120, 200)) > 0.97
    mask[30:40, 50:90] = True
    for join in (1, 2, 3):
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * join + 1,) * 2, np.uint8))
        n, labels = cv2.connectedComponents(grown)
        ref = []
        for i in range(1, n):
            part = (labels == i) & mask
            ys, xs = np.nonzero(part)
            if part.sum() >= 12:
                x0, y0 = int(xs.min()), int(ys.min())
                ref.append(
                    (x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0, int(part.sum()))
                )
        assert _boxes(mask, join) == ref


def test_frames_handed_to_the_encoder_have_no_stale_row_padding():
    """libx264 reads each row's padding; left as the buffer held it, two encodes of the
    same frames differed (27 % of decoded pixels at 432x240) and the bench with them."""
    import av

    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, (240, 432, 3), np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    before = frame.to_ndarray()
    padded = [p for p in frame.planes if p.line_size > p.width]
    assert padded, "432 wide should leave row padding in some plane"
    for p in padded:  # what an earlier use of the buffer may have left there
        np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:, p.width :] = 77
    frame = synth._zero_padding(frame)
    for p in padded:
        assert not np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:, p.width :].any()
    assert np.array_equal(frame.to_ndarray(), before)


def _spot_frames(
    rng: np.random.Generator, mark: np.ndarray, at: tuple[int, int], size: tuple[int, int], n: int
) -> list[np.ndarray]:
    """`n` luma crops of a scene panning under a white mark (shape `mark`, opacity 0.4)."""
    h, w = size
    scene = cv2.GaussianBlur(
        rng.uniform(0, 255, (h + 4 * n, w + 4 * n)).astype(np.float32), (0, 0), 3
    )
    scene = (scene - scene.mean()) * 6 + 110
    alpha = np.zeros((h, w), np.float32)
    alpha[at[0] : at[0] + mark.shape[0], at[1] : at[1] + mark.shape[1]] = 0.4 * mark
    out = []
    for t in range(n):
        bg = np.clip(scene[2 * t : 2 * t + h, 3 * t : 3 * t + w], 0, 255)
        out.append(np.clip((1 - alpha) * bg + alpha * 255, 0, 255).astype(np.uint8))
    return out


def test_a_cut_template_grows_to_the_whole_mark_and_not_into_one_spots_scene():
    from worker.media.auto_grow import grow_shape
    from worker.media.auto_spots import SpotData
    from worker.media.detect import Spot
    from worker.media.scenes import make_watermark

    rng = np.random.default_rng(3)
    shape = make_watermark(26, 104, "GENAI").shape  # a glyph, a gap, then the word
    word = np.flatnonzero(shape[:, 30:].max(0) > 0.5)[0] + 30  # where the glyph ends
    at, size = (24, 30), (80, 170)
    members, spots = [], []
    for i in range(3):
        frames = _spot_frames(rng, shape, at, size, 24)
        if i == 0:
            # scene content this spot's frames kept still, just below the mark
            for f in frames:
                f[at[0] + 30 : at[0] + 34, at[1] + 10 : at[1] + 60] = 250
        spot = Spot(
            x=0, y=0, w=size[1], h=size[0], windows={0}, strong={0}, persistent=False, strength=1.0
        )
        d = SpotData(spot, 100 * i, 0, size[0], size[1], set(), set())
        d.on_y, d.on_idx = frames, list(range(24))
        members.append(d)
        spots.append((100 * i + at[0], at[1] + word))
    # the template a box that missed the glyph gives: the word alone
    cut = torch.from_numpy(shape[:, word:].copy())
    tmpl, grown_spots = cut, spots
    for _ in range(3):
        tmpl, grown_spots = grow_shape(tmpl, grown_spots, members, (400, 300))
    y, x = grown_spots[0][0] - at[0], grown_spots[0][1] - at[1]
    canvas = np.zeros((200, 300), np.float32)
    canvas[50 + y : 50 + y + tmpl.shape[0], 50 + x : 50 + x + tmpl.shape[1]] = tmpl.numpy()
    found = canvas[50 : 50 + shape.shape[0], 50 : 50 + shape.shape[1]] > 0.1
    # the glyph is back ...
    assert found[shape > 0.5].mean() > 0.95, (tmpl.shape, grown_spots)
    # ... and nothing of the bar one spot's scene held
    assert not (canvas > 0.1)[50 + 30 : 50 + 34, 50 + 10 : 50 + 60].any()
    assert all(
        gy - sy == y and gx - sx == x
        for (gy, gx), (sy, sx) in zip(
            grown_spots, [(100 * i + at[0], at[1]) for i in range(3)], strict=True
        )
    )


def test_still_matte_reads_opacity_and_colour_from_the_solid_core():
    """A saturated yellow mark under a still camera (scenes' still-late-colour, no
    codec: frames to yuv420p by OpenCV): the per-pixel matte from the typical frames
    with and without it is within 0.04 of the truth on average (the alternating fit
    alone: 0.08, the opacity read 0.52 for 0.6)."""
    from worker.media.auto_matte import blend_fit, refit_on_core
    from worker.media.auto_spots import upsample_uv
    from worker.media.scenes import make_clip

    clip = make_clip("still-late-colour", 48, 180, 320)
    mark = clip.marks[0]
    y0, x0 = next(p for p in mark.positions if p is not None)
    lh, lw = mark.logo.size
    cy, cx = (y0 - 8) & ~1, (x0 - 8) & ~1
    h, w = min(lh + 16, 180 - cy) & ~1, min(lw + 16, 320 - cx) & ~1

    def crop(frame: np.ndarray) -> np.ndarray:
        fh, fw = frame.shape[:2]
        i420 = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).astype(np.float32)
        q = fh * fw // 4
        uv = np.stack([i420[fh:].reshape(-1)[:q], i420[fh:].reshape(-1)[q:]])
        uv = uv.reshape(2, fh // 2, fw // 2)[:, cy // 2 : (cy + h) // 2, cx // 2 : (cx + w) // 2]
        return np.concatenate([i420[None, cy : cy + h, cx : cx + w], upsample_uv(uv[None])[0]])

    on = [crop(f) for f, p in zip(clip.blended, mark.positions, strict=True) if p is not None]
    off = [crop(f) for f, p in zip(clip.blended, mark.positions, strict=True) if p is None]
    pairs = [(median0(torch.from_numpy(np.stack(on))), median0(torch.from_numpy(np.stack(off))))]
    truth = np.zeros((h, w), np.float32)
    truth[y0 - cy : y0 - cy + lh, x0 - cx : x0 - cx + lw] = (mark.opacity * mark.logo.shape)[
        : h - (y0 - cy), : w - (x0 - cx)
    ]
    on_mark = torch.from_numpy(truth > 0.05)

    def error(a: torch.Tensor) -> float:
        return float((a - torch.from_numpy(truth)).abs()[on_mark].mean())

    a0, w0 = blend_fit(pairs)
    a1, _ = refit_on_core(pairs, a0, w0)
    assert error(a1) < 0.04 < error(a0), (error(a0), error(a1))
