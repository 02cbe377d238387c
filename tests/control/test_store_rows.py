"""The data layer's rows: what an INSERT hands back is exactly what a read returns."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from control.services.jobs import JobSpec, validate_spec
from control.store import jobs as store


async def test_inserted_rows_equal_the_stored_rows(db) -> None:
    full = JobSpec(
        type="video.x",
        params={"b": [1.5, {"c": None}], "a": "é", "n": 3},
        inputs=["https://example.com/a.mp4"],
        priority=-7,
        labels={"gpu": "a100"},
        worker_selector={"zone": "eu"},
        concurrency_key="cam-1",
        concurrency_limit=2,
        min_start_interval_ms=1500,
        not_before=datetime.now(UTC) + timedelta(hours=1),
        timeout_ms=90_000,
        max_attempts=5,
        request_id="r-1",
    )
    plain = JobSpec(type="t")
    year_one = JobSpec(type="t", not_before=datetime(1, 1, 1, tzinfo=UTC))
    jobs = [validate_spec(s, "job", 3) for s in (full, plain, year_one)]
    async with db.autocommit() as conn:
        inserted = await store.insert_jobs(conn, "acme", jobs)
        stored = [await store.get_job(conn, "acme", job.id) for job in jobs]
    assert [row["id"] for row in inserted] == [job.id for job in jobs]
    for got, want in zip(inserted, stored, strict=True):
        assert want is not None
        assert dict(got) == dict(want)
    assert inserted[2]["not_before"] == datetime(1, 1, 1, tzinfo=UTC)  # not -infinity


def test_job_ids_of_a_batch_are_distinct_version_4_uuids() -> None:
    from control.services.jobs import new_job_ids

    ids = new_job_ids(500)
    assert len(set(ids)) == 500
    assert {i.version for i in ids} == {4} and {i.variant for i in ids} == {uuid.RFC_4122}


async def test_only_a_job_with_a_request_id_carries_a_spec_hash(db) -> None:
    plain, keyed = (validate_spec(JobSpec(type="t", request_id=r), "job", 3) for r in ("", "k"))
    assert plain.spec_hash is None and keyed.spec_hash
