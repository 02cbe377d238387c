"""Reading never fails on a stored value: odd progress numbers are clamped or left out.

(Issue 8: Get / List / WatchProgress of a job whose stored values were out of a
protobuf field's range answered INTERNAL, and the job could not be looked at.)
"""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa
from control_support import submit

from spool.v1 import job_service_pb2

pb = job_service_pb2

ODD_PROGRESS = {
    "fraction": 0.5,
    "eta_s": 1e300,
    "time": 1e20,
    "done": 10**30,
    "total": -(10**30),
    "rate": 1e308,
    "stage": "s",
}


async def test_out_of_range_progress_reads_back(jobs, db) -> None:
    job = await submit(jobs)
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text("UPDATE jobs SET progress = CAST(:p AS jsonb) WHERE id = :id"),
            {"p": json.dumps(ODD_PROGRESS), "id": uuid.UUID(job.id)},
        )
        await s.execute(
            sa.text("UPDATE job_events SET progress = CAST(:p AS jsonb) WHERE job_id = :id"),
            {"p": json.dumps(ODD_PROGRESS), "id": uuid.UUID(job.id)},
        )
    got = (await jobs.Get(pb.GetRequest(job_id=job.id))).job
    assert got.progress.fraction == 0.5 and got.progress.stage == "s"
    assert got.progress.done == 2**63 - 1 and got.progress.total == -(2**63)
    assert not got.progress.HasField("eta") and not got.progress.HasField("update_time")
    assert [j.id for j in (await jobs.List(pb.ListRequest())).jobs] == [job.id]
    first = await jobs.WatchProgress(pb.WatchProgressRequest(job_id=job.id)).read()
    assert first.event.progress.done == 2**63 - 1
