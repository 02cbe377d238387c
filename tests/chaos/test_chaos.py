"""`make chaos` in the suite: faults under load, then every invariant from the database and API.

The small run (300 short jobs, 4 workers, 2 replicas, ~40 s of faults) is part of
`make test`; the long one (the full `make chaos` size) runs with SPOOL_SLOW=1.
Each run starts its own embedded Postgres (so it can restart it), or uses
TEST_DATABASE_URL with the Postgres restarts skipped. What is injected and
checked: bench/chaos/ and docs/control-plane.md ("Chaos run").
"""

from __future__ import annotations

import os

import pytest

from bench.chaos.faults import KINDS
from bench.chaos.run import ChaosConfig, format_report, run_chaos

SLOW = os.environ.get("SPOOL_SLOW") == "1"


async def _run(cfg: ChaosConfig) -> None:
    report = await run_chaos(cfg)
    summary = format_report(report)
    print(summary)
    # The run must have exercised what it claims to: every fault kind, most jobs, watchers.
    kinds = set(KINDS) - (set() if cfg.database_url == "" else {"pg_restart"})
    assert kinds <= set(report["faults"]["by_kind"]), summary
    assert report["jobs"]["checked"] >= cfg.jobs * 0.9, summary
    assert report["watchers"]["checked"] > 0 and report["settled"], summary
    assert report["violations"]["total"] == 0, summary


async def test_chaos_300_jobs_every_invariant_holds() -> None:
    await _run(
        ChaosConfig(
            jobs=300, duration_s=40.0, seed=1, database_url=os.environ.get("TEST_DATABASE_URL", "")
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not SLOW, reason="long chaos run: SPOOL_SLOW=1")
async def test_chaos_full_run_every_invariant_holds() -> None:
    await _run(ChaosConfig(seed=2, database_url=os.environ.get("TEST_DATABASE_URL", "")))
