"""The client's TLS options against a real grpc.aio server that requires TLS.

The control plane has no TLS listener of its own yet (TLS is terminated in
front of it), so the peer is a small JobService on a TLS port that answers
GetStats and checks the bearer token.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from spool.client import AsyncClient, Client, errors
from spool.v1 import job_service_pb2, job_service_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("client-pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=spool-client-test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server",
             cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=d)  # fmt: skip
    return d


class _Stats(job_service_pb2_grpc.JobServiceServicer):
    async def GetStats(
        self, request: job_service_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> job_service_pb2.GetStatsResponse:
        if ("authorization", "Bearer tls-key") not in context.invocation_metadata():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        return job_service_pb2.GetStatsResponse(queue_depth=7)


@pytest.fixture
async def tls_server(pki: Path) -> AsyncIterator[int]:
    server = grpc.aio.server()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(_Stats(), server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def test_tls_with_a_ca_bundle(tls_server: int, pki: Path) -> None:
    ca = str(pki / "ca.pem")
    async with AsyncClient(f"localhost:{tls_server}", token="tls-key", tls=True, tls_ca=ca) as c:
        assert (await c.stats()).queue_depth == 7
    async with AsyncClient(f"localhost:{tls_server}", token="wrong", tls=True, tls_ca=ca) as c:
        with pytest.raises(errors.Unauthenticated):
            await c.stats()


async def test_tls_from_the_environment(
    tls_server: int, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOOL_SERVER", f"127.0.0.1:{tls_server}")
    monkeypatch.setenv("SPOOL_TOKEN", "tls-key")
    monkeypatch.setenv("SPOOL_TLS", "on")
    monkeypatch.setenv("SPOOL_TLS_CA", str(pki / "ca.pem"))

    def stats() -> int:
        with Client() as c:
            return c.stats().queue_depth

    assert await asyncio.to_thread(stats) == 7


async def test_untrusted_certificate_is_unavailable(tls_server: int) -> None:
    async with AsyncClient(f"localhost:{tls_server}", tls=True, retry_budget=0.3) as c:
        with pytest.raises(errors.Unavailable):
            await c.stats()
    async with AsyncClient(f"localhost:{tls_server}", tls=False, retry_budget=0.3) as c:
        with pytest.raises(errors.Unavailable):
            await c.stats()
