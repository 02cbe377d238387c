"""docker-compose.yml and the Dockerfiles agree with the code (Docker itself is not run).

Every referenced Dockerfile exists, every SPOOL_* variable they set is read by
the control plane or worker code, published ports match the defaults, and the
control plane's health check command works against a real control plane.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.config import Settings
from spool.client import DEFAULT_SERVER

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_RE = re.compile(r"\bSPOOL_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _code_text() -> str:
    files = [*REPO.glob("control/**/*.py"), *REPO.glob("worker/**/*.py")]
    return "\n".join(p.read_text() for p in files)


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    context = REPO / build.get("context", ".")
    return context / build.get("dockerfile", "Dockerfile")


def test_every_dockerfile_exists(compose: dict[str, Any]) -> None:
    built = {name: s for name, s in compose["services"].items() if "build" in s}
    assert set(built) == {"control", "worker"}
    for name, service in built.items():
        assert _dockerfile(service).is_file(), f"{name}: {_dockerfile(service)} missing"


def test_every_spool_variable_is_read_by_the_code(compose: dict[str, Any]) -> None:
    code = _code_text()
    used: dict[str, str] = {}
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith("SPOOL_"):
                used[key] = f"docker-compose.yml service {name}"
    for dockerfile in REPO.glob("Dockerfile*"):
        for key in ENV_RE.findall(dockerfile.read_text()):
            used[key] = dockerfile.name
    assert used
    unknown = {k: where for k, where in used.items() if k not in code}
    assert not unknown, f"set but never read by control/ or worker/: {unknown}"


def test_ports_match_the_defaults(compose: dict[str, Any]) -> None:
    control = compose["services"]["control"]
    # The gRPC port (the other one published is /metrics, tests/metrics/test_metrics.py).
    (published,) = [p for p in control["ports"] if not str(p).startswith("127.0.0.1:")]
    host_port, container_port = (int(p) for p in str(published).split(":"))
    default_port = int(Settings().listen.rsplit(":", 1)[1])
    listen = _env(control)["SPOOL_LISTEN"]
    assert listen == f"0.0.0.0:{container_port}"
    assert container_port == default_port
    assert host_port == int(DEFAULT_SERVER.rsplit(":", 1)[1])  # the CLI's default reaches it
    assert _env(compose["services"]["worker"])["SPOOL_SERVER"] == f"control:{container_port}"
    expose = re.search(r"^EXPOSE (\d+)", (REPO / "Dockerfile.control").read_text(), re.M)
    assert expose and int(expose.group(1)) == container_port


def test_database_gpu_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    url = _env(services["control"])["SPOOL_DATABASE_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert services["control"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["control"]["volumes"]}
    assert mounts["blobs"] == _env(services["control"])["SPOOL_BLOB_DIR"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert set(compose["volumes"]) >= {"pgdata", "blobs"}
    control_df = (REPO / "Dockerfile.control").read_text()
    worker_df = (REPO / "Dockerfile.worker").read_text()
    assert "FROM python:3.11-slim" in control_df and "[worker]" not in control_df
    assert "nvidia/cuda" in worker_df and '".[worker]"' in worker_df


async def test_health_check_command_works(compose: dict[str, Any], control: Any) -> None:
    test = compose["services"]["control"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("127.0.0.1:50051", control.address)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()
    # The Dockerfile's HEALTHCHECK runs the same probe.
    assert test[3].replace(" ", "") in (REPO / "Dockerfile.control").read_text().replace(" ", "")
