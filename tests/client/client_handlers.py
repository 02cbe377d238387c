"""Handlers of the client tests (loaded by `spool-worker` via SPOOL_WORKER_HANDLERS).

`client.reverse` reads its input and writes the bytes reversed as an output, so
a test can check upload → job → download end to end by content.
"""

from __future__ import annotations

from pydantic import BaseModel

from worker.sdk import Handler, JobContext


class ReverseParams(BaseModel):
    #: the output's file name
    name: str = "reversed.bin"


class Reverse(Handler):
    """Write input 0 reversed to the output `name`; report progress in two steps."""

    name = "client.reverse"
    Params = ReverseParams

    def run(self, ctx: JobContext, params: ReverseParams) -> dict:
        data = ctx.input_path(0).read_bytes()
        ctx.progress(done=1, total=2, unit="steps", stage="reading")
        ctx.output_path(params.name).write_bytes(data[::-1])
        ctx.progress(done=2, total=2, unit="steps", stage="writing")
        return {"bytes": len(data)}
