"""`wgjit serve` end to end: the admin API adds a peer, and a stock wireguard-go client set up
with the config the API returned connects through a running gateway, just in time; disabling
it through the API cuts it off. The server is the real `wgjit serve` process (uvicorn, token
file), on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from wgjit.lab import GATEWAY_PORT, TUNNEL_V4, UAPI_DIR, Client, Host, Lab
from wgjit.store import open_store

pytestmark = pytest.mark.netns

TOKEN = "e2e-token-0123456789abcdefghij"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        lb.add_client()
        yield lb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(lab: Lab, tmp_path: Path) -> Iterator[tuple[httpx.Client, str]]:
    """`wgjit serve` on a fresh store whose defaults make configs that work as printed."""
    gw = lab.reset()
    store = f"sqlite://{tmp_path}/peers.db"
    with open_store(store) as s:
        s.set_defaults(
            {
                "endpoint": gw.underlay_v4,  # the port: the interface's, read by serve
                "client-allowed-ips": f"{TUNNEL_V4}.0/24",
                "pool": f"{TUNNEL_V4}.0/24",
            }
        )
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    # the gateway's key and port from its interface (wireguard-go's UAPI socket is reachable
    # from this namespace); else given
    where = (
        ["--interface", gw.ifname]
        if (UAPI_DIR / f"{gw.ifname}.sock").exists()
        else ["--gateway-public-key", gw.public_key.b64()]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "wgjit", "--store", store, "serve",
         "--listen", f"127.0.0.1:{port}", "--token-file", str(token), *where],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if client.get("/peers", params={"limit": 1}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "wgjit serve did not answer within 30 s"
            time.sleep(0.05)
        yield client, store
    finally:
        client.close()
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
        assert proc.returncode == 0, out


def wg_setconf(c: Client, config: str) -> None:
    """Apply a wg-quick config as wg-quick does: the [Interface] lines that are not wg's
    (Address, DNS, MTU) are the host's; the rest goes to `wg setconf`."""
    wg_lines = [
        line
        for line in config.splitlines()
        if line.split("=", 1)[0].strip() not in ("Address", "DNS", "MTU")
    ]
    c.wg("setconf", c.ifname, "/dev/stdin", input="\n".join(wg_lines) + "\n")


def test_a_peer_added_through_the_api_connects_through_the_gateway(
    lab: Lab, api: tuple[httpx.Client, str]
) -> None:
    client, store = api
    gw: Host = lab.gateways[0]
    phone = lab.clients[0]
    g = lab.start_gateway(store)
    try:
        r = client.post(
            "/peers",
            json={"name": "phone", "allowed_ips": [f"{phone.tunnel_ip}/32"], "preshared_key": True},
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        config = body["config"]
        # the config works as printed: the generated key, the gateway's key and port
        assert "<fill in" not in config, config
        assert f"Endpoint = {gw.underlay_v4}:{GATEWAY_PORT}" in config
        assert f"PublicKey = {gw.public_key.b64()}" in config
        assert body["config_png_base64"]
        wg_setconf(phone, config)  # the client's key is now the one the API generated
        assert phone.ping(gw.tunnel_ip, timeout=5) is not None, "\n".join(g.lines[-20:])
        g.wait_event("install", peer="phone")
        assert body["peer"]["public_key"] in gw.peers()

        # the API sees it installed: the peer's holder and the gateway's claim
        def claimed() -> bool:
            gws = client.get("/gateways").json()
            return any(x["claimed"] == 1 for x in gws)

        deadline = time.monotonic() + 15
        while not claimed():
            assert time.monotonic() < deadline, client.get("/gateways").text
            time.sleep(0.1)
        assert client.get("/peers/phone").json()["holder"] is not None

        # disabled through the API: the gateway evicts it and refuses its knocks
        r = client.post("/peers/phone/disable")
        assert r.status_code == 200 and r.json()["state"] == "disabled"
        g.wait_event("evict", peer="phone", timeout=10)
        assert body["peer"]["public_key"] not in gw.peers()
        assert phone.ping(gw.tunnel_ip, timeout=2) is None
    finally:
        assert g.stop() == 0, "\n".join(g.lines[-20:])
