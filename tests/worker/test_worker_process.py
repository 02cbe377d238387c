"""The real `spool-worker` command as a subprocess, and its configuration."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from fake_control import FakeControl, make_job, wait_until

from worker._config import WorkerIdentity, parse_labels, settings_from_args

SPOOL_WORKER = Path(sys.executable).parent / "spool-worker"


async def _start_worker(peer: FakeControl, tmp_path: Path, log_name: str, **env_extra: str):
    env = dict(os.environ)
    env.update(
        SPOOL_SERVER=peer.address,
        SPOOL_WORKER_SLOTS="2",
        SPOOL_WORKER_TYPES="debug.sleep,debug.noop",
        SPOOL_DEVICE="cpu",
        SPOOL_WORKER_STATE_DIR=str(tmp_path / "state"),
        SPOOL_WORKER_LABELS="zone=a, pool=test",
        SPOOL_WORKER_NAME="proc-worker",
        SPOOL_DRAIN_GRACE_S="1",
    )
    env.update(env_extra)
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115, ASYNC230 - closed by the caller
    proc = await asyncio.create_subprocess_exec(
        str(SPOOL_WORKER), env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    return proc, log


async def test_spool_worker_serves_then_drains_on_sigterm(tmp_path: Path):
    peer = FakeControl()
    await peer.start()
    proc, log = await _start_worker(peer, tmp_path, "worker1.log")
    try:
        await wait_until(lambda: peer.streams and peer.current.hello, what="Hello")
        hello = peer.current.hello
        assert hello.name == "proc-worker" and dict(hello.labels) == {"zone": "a", "pool": "test"}
        assert sorted(hello.job_types) == ["debug.noop", "debug.sleep"] and hello.slots == 2
        stored = (tmp_path / "state" / "worker-id").read_text().strip()
        assert hello.worker_id == stored

        noop = peer.submit(make_job("debug.noop"))
        await wait_until(lambda: noop in peer.results, what="noop result")
        assert peer.results[noop].WhichOneof("message") == "completed"

        short = peer.submit(make_job("debug.sleep", {"duration": 0.6, "steps": 3}))
        long = peer.submit(
            make_job("debug.sleep", {"duration": 60, "steps": 60, "ignore_cancel": True})
        )
        await wait_until(lambda: short in peer.running and long in peer.running)
        await wait_until(lambda: len(peer.messages("progress")) >= 1, what="progress")
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 15)
        assert rc == 0, (tmp_path / "worker1.log").read_text()
        assert peer.results[short].WhichOneof("message") == "completed"
        assert peer.results[long].WhichOneof("message") == "released"
        assert peer.violations == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()

    # Restarted, it comes back with the same id.
    first_id = hello.worker_id
    proc, log = await _start_worker(peer, tmp_path, "worker2.log")
    try:
        await wait_until(lambda: len(peer.streams) >= 2 and peer.current.hello, what="Hello 2")
        assert peer.current.hello.worker_id == first_id
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await peer.stop()


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("SPOOL_SERVER", "ctl:1")
    monkeypatch.setenv("SPOOL_WORKER_SLOTS", "3")
    monkeypatch.setenv("SPOOL_WORKER_TYPES", "a.b, c.d")
    monkeypatch.setenv("SPOOL_TLS_CA", "/ca.pem")
    s = settings_from_args(["--slots", "4", "--labels", "gpu=a100,zone=eu"])
    assert s.server == "ctl:1" and s.slots == 4 and s.types == ["a.b", "c.d"]
    assert s.labels == {"gpu": "a100", "zone": "eu"} and s.tls
    with pytest.raises(SystemExit):
        settings_from_args(["--labels", "novalue"])
    with pytest.raises(SystemExit):
        settings_from_args(["--slots", "0"])


def test_parse_labels_names_the_bad_item():
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="'x'"):
        parse_labels("a=1,x")


def test_worker_identity_is_stable_and_distinct_per_live_process(tmp_path: Path):
    a, b = WorkerIdentity(tmp_path), WorkerIdentity(tmp_path)
    id_a = a.acquire()
    id_b = b.acquire()  # a holds worker-id, so b gets worker-id.1
    assert id_a != id_b
    a.release()
    b.release()
    c = WorkerIdentity(tmp_path)
    assert c.acquire() == id_a
    c.release()


async def test_bad_handlers_module_exits_1(tmp_path: Path):
    peer = FakeControl()
    await peer.start()
    proc, log = await _start_worker(
        peer, tmp_path, "bad.log", SPOOL_WORKER_HANDLERS="no_such_module_xyz:Thing"
    )
    try:
        assert await asyncio.wait_for(proc.wait(), 30) == 1
        text = (tmp_path / "bad.log").read_text()
        # Found in the worker process itself (it looks for thread types there).
        assert "cannot load the job types: ModuleNotFoundError" in text
        assert "no_such_module_xyz" in text and "Traceback" not in text
        assert peer.streams == []  # it never announced itself
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await peer.stop()


def test_resolve_device():
    from worker._slot_child import resolve_device

    assert resolve_device("cpu")["device"] == "cpu"
    with pytest.raises(ValueError, match="gpu"):
        resolve_device("gpu")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        assert resolve_device("auto")["kind"] == "cuda"
    else:
        assert resolve_device("auto") == resolve_device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda:0")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_slots_exit_when_the_agent_is_killed(tmp_path: Path):
    peer = FakeControl()
    await peer.start()
    proc, log = await _start_worker(peer, tmp_path, "killed.log", SPOOL_WORKER_SLOTS="1")
    try:
        await wait_until(lambda: peer.streams and peer.current.hello, what="Hello")
        key = peer.submit(make_job("debug.sleep", {"duration": 60, "ignore_cancel": True}))
        await wait_until(lambda: key in peer.running)
        await wait_until(lambda: _children(proc.pid), what="slot process")
        slots = _children(proc.pid)
        proc.kill()
        await proc.wait()
        # An orphaned slot notices within PARENT_WATCH_INTERVAL_S and exits, job or not.
        await wait_until(lambda: not any(_alive(p) for p in slots), limit_s=10, what="slots gone")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await peer.stop()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_a_worker_of_thread_types_only_runs_no_slot_process_and_no_workdir(tmp_path: Path):
    peer = FakeControl()
    await peer.start()
    work = tmp_path / "work"
    proc, log = await _start_worker(
        peer,
        tmp_path,
        "threads.log",
        SPOOL_WORKER_TYPES="debug.noop",
        SPOOL_WORKER_WORKDIR=str(work),
    )
    try:
        await wait_until(lambda: peer.streams and peer.current.hello, what="Hello")
        hello = peer.current.hello
        assert list(hello.job_types) == ["debug.noop"] and hello.slots == 2
        assert hello.device.kind == "cpu"
        keys = [peer.submit(make_job("debug.noop")) for _ in range(20)]
        await wait_until(lambda: all(k in peer.results for k in keys), what="20 noops")
        assert all(peer.results[k].WhichOneof("message") == "completed" for k in keys)
        assert _children(proc.pid) == []  # no slot process (nor a resource tracker)
        assert not work.exists()  # no job asked for a work directory
        assert peer.violations == []
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await peer.stop()
