"""`auto` mode's restore-time tracking: per frame, where is each mark?

At each spot of each mark, per frame, the mark is taken as present when
inverting the blend there removes the mark's pattern instead of adding it
(`MarkTracker._ratios`, with hysteresis: `ENTER_RATIO` to enter,
`STAY_RATIO` to stay); only then is the crop restored. Frames without the
mark go from decoder to encoder untouched. The frames where each spot is
present become its runs (frames, box, score) for report.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.media import io as vio
from worker.media.detect import gradients
from worker.media.restore import invert_blend

if TYPE_CHECKING:
    from worker.media.overlay import OverlayRemover, Placement, Region

#: per frame: the mark is present when inverting leaves at most this share of the
#: edge energy under it (entering) / keeps it present below the second (staying)
ENTER_RATIO = 0.92
STAY_RATIO = 1.0


@dataclass
class AutoMark:
    """An accepted mark: its region index and the top-left (y, x) of each of its spots."""

    region: int
    spots: list[tuple[int, int]]
    still: bool
    #: per spot: present in the previous frame (hysteresis) and its runs so far
    state: list[bool] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: the template's (height, width)
    size: tuple[int, int] = (0, 0)


class MarkTracker:
    """Decides, batch by batch, which marks are present where, and keeps their runs."""

    def __init__(self, remover: OverlayRemover, marks: list[AutoMark]) -> None:
        self.r, self.marks = remover, marks
        #: per (region, offset): what the presence test reads of each plane
        self._probes: dict[tuple[int, tuple[int, int]], list[_Probe]] = {}

    def placements(self, frames: list, first_index: int) -> list[list[Placement]]:
        """Per frame of the batch, the placements of the marks present in it."""
        out: list[list[Placement]] = [[] for _ in frames]
        if not self.marks:
            return out
        views = [vio.plane_views(f) for f in frames]
        for m in self.marks:
            region = self.r.regions[m.region]
            for si, (sy, sx) in enumerate(m.spots):
                pl = self.r._template_placement(sy, sx, region.h, region.w, m.region)
                ratios = self._ratios(region, pl, views)
                for k, ratio in enumerate(ratios):
                    idx = first_index + k
                    limit = STAY_RATIO if m.state[si] else ENTER_RATIO
                    present = ratio < limit
                    m.state[si] = present
                    if present:
                        out[k].append(pl)
                        self._extend_run(m, si, idx, 1 - ratio)
        return out

    def _ratios(self, region: Region, pl: Placement, views: list) -> list[float]:
        """How much of the mark's pattern is left after inverting the blend at `pl`, per frame.

        The correlation of the crop's gradients with the matte's, after
        inverting over before (batched), in Y and U/V together: a mark that is
        there imprints its matte's edges on the crop and inverting removes them
        (after ~ 0, before well above); inverting where it is not imprints
        their negative (after well above, before ~ 0). Each plane counts by its
        own |covariance| with the matte, so a coloured mark whose luma is close
        to the scene's is judged mostly on U/V. A ratio of gradient *energies*
        instead would also count the background's own edges, which inverting
        brings back amplified: on a textured background a mark that was there
        was judged absent.

        Only the box of pixels the gradients on the matte's support read is
        cropped, inverted and differentiated (`_Probe`): the same numbers as
        on the whole crop, for a third less work at 720p.
        """
        key = (pl.region, pl.offset)
        if key not in self._probes:
            self._probes[key] = _probes(region, pl.offset)
        assert region.colour_y is not None and region.colour_uv is not None
        colours = [region.colour_y, region.colour_uv[0:1], region.colour_uv[1:2]]
        before = after = norm = None
        for c, probe in enumerate(self._probes[key]):
            y0, x0 = (pl.y0, pl.x0) if c == 0 else (pl.y0 // 2, pl.x0 // 2)
            y0, x0 = y0 + probe.y0, x0 + probe.x0
            crops = np.stack([v[c][y0 : y0 + probe.h, x0 : x0 + probe.w] for v in views])
            j = self.r.stager.to_device(crops).float()
            inv = invert_blend(j[:, None], probe.alpha, colours[c])[:, 0]
            g_j = gradients(j).flatten(2).index_select(2, probe.support)
            g_i = gradients(inv).flatten(2).index_select(2, probe.support)
            b = (g_j * probe.g_a).sum((1, 2)).abs()
            a = (g_i * probe.g_a).sum((1, 2)).abs()
            n = g_j.flatten(1).norm(dim=1) + g_i.flatten(1).norm(dim=1)
            before = b if before is None else before + b
            after = a if after is None else after + a
            norm = n if norm is None else norm + n
        assert before is not None and after is not None and norm is not None
        # |covariances| summed over planes; each side over the same norm, so the
        # ratio is that of the two correlations
        return (after / before.clamp_min(1e-3 * norm.clamp_min(1.0))).tolist()

    def _extend_run(self, m: AutoMark, si: int, idx: int, score: float) -> None:
        last = next((r for r in reversed(m.runs) if r["spot"] == si), None)
        if last is not None and last["end_frame"] == idx - 1:
            last["end_frame"] = idx
            last["min_score"] = round(min(last["min_score"], score), 3)
            return
        region = self.r.regions[m.region]
        th, tw = region.shape.shape if region.shape is not None else (0, 0)
        y, x = m.spots[si]
        m.runs.append(
            {
                "spot": si,
                "start_frame": idx,
                "end_frame": idx,
                "box": {"x": x, "y": y, "w": int(tw), "h": int(th)},
                "min_score": round(score, 3),
            }
        )


@dataclass(frozen=True)
class _Probe:
    """What the presence test reads of one plane of a placed mark's crop.

    The gradients are taken on the matte's support (alpha > 0.02, grown by
    1 px); those read one pixel more around it, so only the box of that is
    cropped (`y0`, `x0`, `h`, `w` inside the plane's crop), and the support is
    kept as flat indices into the box, row-major like a boolean mask's.
    """

    y0: int
    x0: int
    h: int
    w: int
    #: the matte over the box, the support's flat indices in it, and the
    #: matte's gradients there, of unit norm (2, n)
    alpha: torch.Tensor
    support: torch.Tensor
    g_a: torch.Tensor


def _probes(region: Region, offset: tuple[int, int]) -> list[_Probe]:
    """The `_Probe` of the Y, U and V planes of `region` placed at `offset`."""
    a_y, a_uv = region.alphas(offset)
    out = []
    for a in (a_y, a_uv, a_uv):
        support = F.max_pool2d((a > 0.02).float()[None, None], 3, 1, 1)[0, 0] > 0
        g_a = gradients(a[None])[0][:, support]
        g_a = g_a / g_a.norm().clamp_min(1e-6)
        read = F.max_pool2d(support.float()[None, None], 3, 1, 1)[0, 0] > 0
        ys, xs = torch.nonzero(read, as_tuple=True)
        if len(ys) == 0:  # no support: an empty box reads nothing
            ys, xs = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        inside = support[y0:y1, x0:x1].flatten()
        out.append(
            _Probe(
                y0,
                x0,
                y1 - y0,
                x1 - x0,
                a[y0:y1, x0:x1].contiguous(),
                torch.nonzero(inside, as_tuple=True)[0].to(a.device),
                g_a,
            )
        )
    return out
