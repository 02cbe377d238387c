"""A handler of the metrics tests (loaded by `spool-worker` via SPOOL_WORKER_HANDLERS).

`test.frames` "decodes" `frames` frames at `fps` frames per second, reporting
progress in frames, so the worker's frames/s gauge has something to show.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from worker.sdk import Handler, JobContext


class FramesParams(BaseModel):
    frames: int = Field(default=40, ge=1)
    fps: float = Field(default=20.0, gt=0)


class Frames(Handler):
    """Report `done=n, unit="frames"` for every frame, `1/fps` seconds apart."""

    name = "test.frames"
    Params = FramesParams

    def run(self, ctx: JobContext, params: FramesParams) -> dict:
        for n in range(1, params.frames + 1):
            ctx.check_cancelled()
            time.sleep(1.0 / params.fps)
            ctx.progress(done=n, total=params.frames, unit="frames", stage="decoding")
        return {"frames": params.frames}
