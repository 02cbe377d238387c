"""The worker's token and mutual TLS against a scripted peer that requires client certs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fake_control import FakeControl, make_job, wait_until

EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert (CN=worker)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=spool-test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text(EXT + "\n")
    for name in ("server", "worker"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


async def test_mtls_and_token(pki: Path, start_agent):
    peer = FakeControl()
    await peer.start(
        tls={
            "key": (pki / "server.key").read_bytes(),
            "cert": (pki / "server.pem").read_bytes(),
            "ca": (pki / "ca.pem").read_bytes(),
        }
    )
    try:
        await start_agent(
            peer,
            slots=1,
            token="wk-secret",
            tls=True,
            tls_ca=str(pki / "ca.pem"),
            tls_cert=str(pki / "worker.pem"),
            tls_key=str(pki / "worker.key"),
        )
        await wait_until(lambda: peer.streams and peer.current.hello, what="Hello over mTLS")
        stream = peer.current
        assert stream.metadata.get("authorization") == "Bearer wk-secret"
        assert stream.auth.get("x509_common_name") == [b"worker"]
        key = peer.submit(make_job("debug.noop"))
        await wait_until(lambda: key in peer.results)
    finally:
        await peer.stop()
