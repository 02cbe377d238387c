"""Fixtures for the media tests: small synthetic clips with a known mark, made once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.media import synth
from worker.media.quality import Case, make_case

#: the small clip every media test uses: a few dozen frames, small resolution
N_FRAMES, HEIGHT, WIDTH = 48, 144, 256


@dataclass
class Clip:
    """A blended clip on disk (H.264, with audio) and its ground truth."""

    case: Case
    path: Path
    template: Path


@pytest.fixture(autouse=True)
def _skip_slow(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") and os.environ.get("SPOOL_SLOW") != "1":
        pytest.skip("slow: set SPOOL_SLOW=1")


def _clip(tmp: Path, kind: str) -> Clip:
    case = make_case(kind, N_FRAMES, HEIGHT, WIDTH)
    path = synth.write_video(tmp / f"{kind}.mp4", case.blended, crf=18, audio=True)
    return Clip(case, path, case.logo.save_png(tmp / "logo.png"))


@pytest.fixture(scope="session")
def static_clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    """A mark that stays in one place."""
    return _clip(tmp_path_factory.mktemp("static"), "static")


@pytest.fixture(scope="session")
def jumping_clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    """A mark that jumps between 3 positions."""
    return _clip(tmp_path_factory.mktemp("jumping"), "jumping")
