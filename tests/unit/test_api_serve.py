"""The real `wgjit serve` process on loopback: HTTPS with a certificate made here, the token
checked, SIGTERM a clean stop (exit 0), and a port in use one line."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wgjit.store import open_store

TOKEN = "serve-token-0123456789abcdef"


def self_signed(dir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dir / "cert.pem", dir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    store = f"sqlite://{tmp_path}/peers.db"
    with open_store(store) as s:
        s.set_defaults({"pool": "100.65.0.0/24"})
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    yield store, token


def serve(store: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wgjit", "--store", store, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_answering(proc: subprocess.Popen[str], client: httpx.Client) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            client.get("/openapi.json")
            return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "wgjit serve did not answer within 30 s"
        time.sleep(0.05)


def test_https_with_a_token_and_a_clean_stop(setup: tuple[str, Path], tmp_path: Path) -> None:
    store, token = setup
    cert, key = self_signed(tmp_path)
    port = free_port()
    proc = serve(store, "--listen", f"127.0.0.1:{port}", "--token-file", str(token),
                 "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust) as client:
            wait_answering(proc, client)
            assert client.get("/api/v1/peers").status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = client.post("/api/v1/peers", json={"name": "phone"}, headers=auth)
            assert r.status_code == 201, r.text
            r = client.get("/api/v1/peers", headers=auth)
            assert [p["name"] for p in r.json()["items"]] == ["phone"]
            # and it speaks no plain HTTP
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0, out
    assert f"wgjit serve: https://127.0.0.1:{port}/api/v1" in out
    assert TOKEN not in out  # never logged


def test_a_port_in_use_is_one_line(setup: tuple[str, Path]) -> None:
    store, token = setup
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve(store, "--listen", f"127.0.0.1:{port}", "--token-file", str(token))
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1
    assert out == (
        f"wgjit: error: --listen 127.0.0.1:{port}: cannot listen there (Address already in"
        " use); choose another address or port\n"
    )


def test_a_missing_store_is_one_line(tmp_path: Path, setup: tuple[str, Path]) -> None:
    _, token = setup
    missing = tmp_path / "typo.db"
    proc = serve(f"sqlite://{missing}", "--token-file", str(token))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and out.count("\n") == 1 and "wgjit store init" in out
    assert not missing.exists()
