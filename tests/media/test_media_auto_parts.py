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


def test_ncc_map_matches_the_direct_correlation():
    """The FFT form (5-smooth sizes, no padding by the pattern, window sums from
    integral images) against |NCC| computed window by window."""
    from worker.media.locate import fft_size, ncc_map

    assert [fft_size(n) for n in (1, 7, 11, 97, 733)] == [1, 8, 12, 100, 750]
    rng = np.random.default_rng(5)
    for h, w, th, tw in ((23, 37, 5, 9), (31, 29, 31, 4), (16, 40, 1, 1), (41, 53, 40, 2)):
        frames = torch.from_numpy(rng.uniform(0, 255, (2, h, w)).astype(np.float32))
        pattern = torch.from_numpy(rng.uniform(-1, 1, (th, tw)).astype(np.float32))
        got = ncc_map(frames, pattern)
        p = (pattern - pattern.mean()).double()
        want = torch.zeros(2, h - th + 1, w - tw + 1, dtype=torch.float64)
        for y in range(h - th + 1):
            for x in range(w - tw + 1):
                win = frames[:, y : y + th, x : x + tw].double()
                c = win - win.mean((1, 2), keepdim=True)
                den = (c.flatten(1).norm(dim=1) * p.norm()).clamp_min(1e-3)
                want[:, y, x] = ((c * p).sum((1, 2)) / den).abs()
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, atol=1e-4), (h, w, th, tw)


def test_nanmedian_per_pattern_matches_numpy():
    """`_nanmedian0` (one plain median per pattern of NaNs) gives numpy's numbers exactly,
    NaN where no frame holds a pixel."""
    import warnings

    from worker.media.auto_grow import _nanmedian0

    rng = np.random.default_rng(6)
    a = rng.uniform(0, 255, (37, 30, 50)).astype(np.float32)
    a[:12, :, 40:] = np.nan  # one spot's crops end on the right ...
    a[12:25, :5] = np.nan  # ... another's at the top
    a[:, :3, 45:] = np.nan  # and no crop holds this corner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(a, axis=0)
    got = _nanmedian0(a)
    assert got.dtype == want.dtype and np.isnan(got[:3, 45:]).all()
    assert np.array_equal(got, want, equal_nan=True)


def test_presence_ratios_read_only_the_box_the_gradients_need():
    """The presence test on the box its gradients read (`_Probe`) against the same
    computation on whole crops: the same ratios."""
    from types import SimpleNamespace

    from worker.media.auto_track import MarkTracker
    from worker.media.detect import gradients
    from worker.media.device import Stager
    from worker.media.overlay import Placement, Region
    from worker.media.restore import invert_blend

    rng = np.random.default_rng(7)
    shape = torch.zeros(14, 30)
    shape[3:11, 4:26] = torch.from_numpy(rng.uniform(0.3, 1, (8, 22)).astype(np.float32))
    region = Region(h=28, w=44, shape=shape, template=True, opacity=0.5)
    region.colour_y, region.colour_uv = torch.tensor([230.0]), torch.tensor([120.0, 140.0])
    pl = Placement(0, 10, 6, (7, 6))
    a_y, a_uv = region.alphas(pl.offset)
    frames = []
    for k in range(5):
        y = rng.integers(0, 256, (60, 80)).astype(np.uint8)
        uv = [rng.integers(0, 256, (30, 40)).astype(np.uint8) for _ in range(2)]
        if k % 2:  # the mark is there in every other frame
            crop = y[10:38, 6:50].astype(np.float32)
            y[10:38, 6:50] = (crop * (1 - a_y.numpy()) + 230 * a_y.numpy()).round()
        frames.append([y, *uv])
    tracker = MarkTracker(SimpleNamespace(stager=Stager(torch.device("cpu"))), [])  # type: ignore[arg-type]
    got = tracker._ratios(region, pl, frames)

    before = after = norm = torch.zeros(len(frames))
    colours = [region.colour_y, region.colour_uv[:1], region.colour_uv[1:]]
    for c, a in enumerate((a_y, a_uv, a_uv)):
        y0, x0, h, w = (10, 6, 28, 44) if c == 0 else (5, 3, 14, 22)
        j = torch.from_numpy(np.stack([f[c][y0 : y0 + h, x0 : x0 + w] for f in frames])).float()
        inv = invert_blend(j[:, None], a, colours[c])[:, 0]
        support = F.max_pool2d((a > 0.02).float()[None, None], 3, 1, 1)[0, 0] > 0
        g_a = gradients(a[None])[0][:, support]
        g_a = g_a / g_a.norm()
        g_j, g_i = gradients(j)[:, :, support], gradients(inv)[:, :, support]
        before = before + (g_j * g_a).sum((1, 2)).abs()
        after = after + (g_i * g_a).sum((1, 2)).abs()
        norm = norm + g_j.flatten(1).norm(dim=1) + g_i.flatten(1).norm(dim=1)
    want = (after / before.clamp_min(1e-3 * norm.clamp_min(1.0))).tolist()
    assert got == want
    assert all(r < 0.92 for r in got[1::2]) and all(r > 1.0 for r in got[::2]), got


def test_rejections_keep_each_candidates_latest_reason_in_order():
    from worker.media.auto_spots import Rejections, SpotData
    from worker.media.detect import Spot

    def data(x: int) -> SpotData:
        spot = Spot(x=x, y=0, w=8, h=8, windows={0}, strong={0}, persistent=False, strength=1)
        return SpotData(spot, 0, x, 8, 8, set(), set())

    a, b, c = data(0), data(10), data(20)
    rejections = Rejections([{"reason": "from detection"}])
    assert rejections.add(a, "first") is False
    rejections.add(b, "second")
    # candidates tested apart, each into its own record, merged in their order
    own_a, own_c = Rejections(), Rejections()
    own_a.add(a, "again", score=1)
    own_c.add(c, "third")
    rejections.extend(own_a)
    rejections.extend(own_c)
    rejections.drop(b)  # claimed by a mark after all
    reasons = [(e.get("x"), e["reason"]) for e in rejections.entries()]
    assert reasons == [(None, "from detection"), (0, "again"), (20, "third")]
