"""bench.throughput: a tiny real run (Spool only), and its CPU and profile accounting."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import systems, throughput

REPO = Path(__file__).resolve().parents[2]


def test_tiny_spool_run_prints_every_row() -> None:
    cmd = [sys.executable, "-m", "bench.throughput", "--systems", "spool", "--jobs", "40"]
    cmd += ["--samples", "10", "--reps", "1", "--pgbench-seconds", "1", "--echo-seconds", "0.2"]
    cmd += ["--spool-workers", "1x2", "--no-report"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "\n## Throughput and round trip" in out
    table = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert "| | Spool |" in out and "pgqueuer" not in out.split("Ceilings")[0]
    for row in [
        "jobs/s, batched submit (500 a batch)",
        "jobs/s, one submit at a time, 1 caller",
        "jobs/s, one submit at a time, 64 concurrent callers",
        "round trip p50 / p99 ms (submit → done seen, idle workers)",
        "CPU µs per job, batched (all processes)",
    ]:
        assert row in table, row
        cell = table[row][0].strip(" |")
        assert cell != "—" and float(cell.split()[0].replace(",", "")) > 0, (row, cell)
    assert "pgbench on the same Postgres: " in out and " TPS " in out
    assert "grpc.aio unary echo, in-process: " in out
    assert "- Spool: client " in out and "postgres " in out and "control " in out


def test_cpu_seconds_counts_children_that_exited() -> None:
    me = {"tree": (systems.os.getpid(), True)}
    before = systems.cpu_seconds(me)["tree"]
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    after = systems.cpu_seconds(me)["tree"]
    assert after - before >= 0.25
    # Without descendants only this process counts: the child's 0.3 s is not in it.
    alone = {"self": (systems.os.getpid(), False)}
    t0, c0 = time.process_time(), systems.cpu_seconds(alone)["self"]
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert systems.cpu_seconds(alone)["self"] - c0 < 0.2 + (time.process_time() - t0)


def test_pyspy_summary_self_and_inclusive(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    parent = 'process 7:"python -m worker.main"'
    raw.write_text(
        f"{parent};run (asyncio/base_events.py:10);claim (control/store/jobs.py:3);"
        "execute (sqlalchemy/engine/base.py:5) 6\n"
        f"{parent};run (asyncio/base_events.py:12);write (asyncpg/proto.py:7) 3\n"
        f'{parent};process 8:"spawn_main(fd=1)";_run_one (worker/_slot_child.py:9) 1\n'
    )
    got = throughput.summarize_pyspy(raw)
    assert got["samples"] == 10 and got["children"] == 10.0
    assert got["self"][0] == ("execute (sqlalchemy/engine/base.py)", 60.0)
    assert dict(got["self"])["_run_one (worker/_slot_child.py)"] == 10.0
    assert dict(got["packages"]) == {"sqlalchemy": 60.0, "asyncpg": 30.0, "worker": 10.0}
    # Inclusive: only Spool's own frames, each counted once per stack.
    assert dict(got["inclusive"]) == {
        "claim (control/store/jobs.py)": 60.0,
        "_run_one (worker/_slot_child.py)": 10.0,
    }
