"""The `spool` CLI through typer's CliRunner, against a real control plane and worker.

The runner is called in a thread: the control plane serves on the test's event
loop, which must keep running while a command waits for its reply.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import TENANT_A_KEY
from typer.testing import CliRunner

from spool.cli import app

pytestmark = pytest.mark.timeout(60)


def _run(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env=env)


async def spool(cp: Any, *args: str) -> Any:
    """Run `spool ARGS` against `cp` (server and token from the environment)."""
    env = {"SPOOL_SERVER": cp.address, "SPOOL_TOKEN": TENANT_A_KEY}
    return await asyncio.to_thread(_run, list(args), env)


def _one_line_error(result: Any, *, after_progress: bool = False) -> str:
    """The single `error: …` line of stderr (after the progress bar's lines, if asked)."""
    lines = result.stderr.strip().splitlines()
    if after_progress:
        lines = lines[-1:]
        assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


async def test_submit_watch_download(cp: Any, worker: Any, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"spool!" * 1000)
    out = tmp_path / "out"
    result = await spool(
        cp, "submit", "client.reverse", "--input", str(src), "--param", "name=r.bin",
        "--watch", "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "r.bin").read_bytes() == src.read_bytes()[::-1]
    assert "succeeded" in result.stdout

    listed = await spool(cp, "list", "--json")
    assert listed.exit_code == 0, listed.output
    jobs = json.loads(listed.stdout)
    assert [j["type"] for j in jobs] == ["client.reverse"]
    job_id = jobs[0]["id"]

    got = await spool(cp, "get", job_id, "--json")
    assert json.loads(got.stdout)["state"] == "JOB_STATE_SUCCEEDED"
    watched = await spool(cp, "watch", job_id, "--json")  # replays the finished job
    assert watched.exit_code == 0, watched.output
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["seq"] for e in events] == [str(n) for n in range(1, len(events) + 1)]
    again = await spool(cp, "download", job_id, "--output", str(tmp_path / "again"), "--json")
    assert [Path(p).name for p in json.loads(again.stdout)] == ["r.bin"]

    for command in (["list"], ["get", job_id], ["stats"], ["workers"]):
        human = await spool(cp, *command)
        assert human.exit_code == 0, (command, human.output)
    assert job_id in (await spool(cp, "list")).stdout
    assert worker.worker_id in (await spool(cp, "workers")).stdout
    stats = json.loads((await spool(cp, "stats", "--json")).stdout)
    assert stats["totals"]["succeeded"] == "1"
    workers = json.loads((await spool(cp, "workers", "--json")).stdout)
    assert [w["id"] for w in workers] == [worker.worker_id]


async def test_failed_job_exits_1_with_its_error(cp: Any, worker: Any) -> None:
    result = await spool(
        cp, "submit", "debug.sleep", "-p", "duration=0.05", "-p", "steps=1", "-p", "fail_at=1",
        "-p", "fail_permanent=true", "--watch",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    line = _one_line_error(result, after_progress=True)
    assert "failed" in line and "DEBUG_FAIL" in line


async def test_params_from_a_file_and_flags(cp: Any, tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text('{"duration": 9, "echo": {"a": [1, 2]}, "steps": 3}')
    result = await spool(
        cp, "submit", "debug.sleep", "--params-json", str(params), "-p", "duration=0.5",
        "-p", "note=plain text", "-p", 'quoted="007"', "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"] == {
        "duration": 0.5,
        "echo": {"a": [1, 2]},
        "steps": 3,
        "note": "plain text",
        "quoted": "007",
    }


async def test_cancel_retry_delete_and_json(cp: Any) -> None:
    submitted = await spool(cp, "submit", "debug.sleep", "--priority", "3", "--json")
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(submitted.stdout)
    assert job["priority"] == 3 and job["state"] == "JOB_STATE_QUEUED"
    plain = await spool(cp, "submit", "debug.noop", "--key", "k1", "-l", "team=a")
    assert plain.exit_code == 0 and len(plain.stdout.strip()) == 36  # just the id

    canceled = await spool(cp, "cancel", job["id"])
    assert canceled.stdout.strip() == f"{job['id']} canceled"
    watched = await spool(cp, "watch", job["id"])
    assert watched.exit_code == 1
    assert "canceled" in _one_line_error(watched, after_progress=True)
    retried = await spool(cp, "retry", job["id"], "--json")
    assert json.loads(retried.stdout)["state"] == "JOB_STATE_QUEUED"
    queued = json.loads((await spool(cp, "list", "--state", "queued", "--json")).stdout)
    assert len(queued) == 2
    await spool(cp, "cancel", job["id"])
    deleted = await spool(cp, "delete", job["id"])
    assert deleted.exit_code == 0, deleted.output
    missing = await spool(cp, "get", job["id"])
    assert missing.exit_code == 1
    assert "NOT_FOUND" in _one_line_error(missing)
    bad = await spool(cp, "get", "nope")
    assert bad.exit_code == 1
    assert "job_id" in _one_line_error(bad)


@pytest.mark.parametrize(
    "args",
    [
        ["submit"],
        ["submit", "debug.sleep", "--param", "novalue"],
        ["submit", "debug.sleep", "--priority", "101"],
        ["submit", "debug.sleep", "--priority", "high"],
        ["submit", "debug.sleep", "--input", "/no/such/file"],
        ["submit", "debug.sleep", "--params-json", "/no/such.json"],
        ["list", "--state", "sleeping"],
        ["list", "--limit", "0"],
        ["get"],
        ["frobnicate"],
        ["get", "x", "--bogus"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    result = _run(args, env={"SPOOL_SERVER": "127.0.0.1:1"})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    _one_line_error(result)


def test_unreachable_server_is_one_line() -> None:
    result = _run(["stats", "--server", "127.0.0.1:1"], env={"SPOOL_SERVER": ""})
    assert result.exit_code == 1
    assert "UNAVAILABLE" in _one_line_error(result)
