"""Checks of the gateway's completion modes (hold, replay, invert), reusable on any lab flavour.

Each `check_*` takes a lab whose gateway host and clients are built (e.g. `wgjit.lab.Lab` on
wireguard-go, or a kernel-WireGuard lab with the same `gateway`/`clients` interface), an empty
store URL, and the mode; it starts and stops its own `wgjit gateway --mode MODE`. The test
modules decide which labs and modes to run them on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Protocol

from wgjit.addr import Endpoint
from wgjit.lab import Client, GatewayProcess, Host, wait_for

MODES = ("hold", "replay", "invert")


class AnyLab(Protocol):
    gateway: Host | None
    clients: list[Client]

    def start_gateway(self, store_url: str, *args: str) -> GatewayProcess: ...


def add_peer(store_url: str, name: str, c: Client) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "wgjit", "--store", store_url, "peer", "add", name,
         "--allowed-ips", f"{c.tunnel_ip}/32", "--public-key", c.public_key.b64()],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def stats(g: GatewayProcess) -> dict[str, str]:
    before = len(g.events("stats"))
    g.proc.send_signal(signal.SIGUSR1)
    wait_for("stats line", lambda: len(g.events("stats")) > before)
    return g.events("stats")[-1]


def endpoint_of(c: Client) -> str:
    port = c.wg("show", c.ifname, "listen-port").strip()
    return f"[{c.underlay_v6}]:{port}" if c.use_v6 else f"{c.underlay_v4}:{port}"


def check_first_contact(
    lab: AnyLab, store_url: str, mode: str, client: Client, max_ms: float = 1000
) -> float:
    """A stored peer with no session knocks: installed with its own endpoint, first ping
    answered well before the client's 5 s retry, by the means `mode` says. Returns the ms."""
    gw = lab.gateway
    assert gw is not None
    add_peer(store_url, "first", client)
    g = lab.start_gateway(store_url, "--mode", mode)
    try:
        assert g.events("ready")[-1]["mode"] == mode
        assert client.public_key.b64() not in gw.peers()
        rtt = client.ping(gw.tunnel_ip, timeout=4)
        assert rtt is not None and rtt < max_ms, f"{mode}: first ping took {rtt} ms"
        peer = gw.peers()[client.public_key.b64()]
        assert Endpoint.parse(peer["endpoint"]) == Endpoint.parse(endpoint_of(client))
        s = stats(g)
        if mode == "hold":
            assert int(s["queue_accepted"]) >= 1, s
            assert "captured" not in s, "hold mode needs no AF_PACKET capture"
        elif mode == "replay":
            assert int(s["replayed"]) == 1, s
        # hold and replay never touch the keepalive; invert switches it back off
        wait_for("no keepalive left", lambda: gw.peers()[client.public_key.b64()]["keepalive"]
                 == "off", timeout=2)  # fmt: skip
        # a second session of the installed peer goes straight through
        client.connect_to(gw)
        again = client.ping(gw.tunnel_ip, timeout=4)
        assert again is not None and again < max_ms
        assert len(g.events("install")) == 1
        return rtt
    finally:
        assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])


def check_refusals(lab: AnyLab, store_url: str, mode: str, alice: Client, bob: Client) -> None:
    """Unknown and revoked peers are never installed nor answered; in hold mode their held
    initiations are dropped."""
    gw = lab.gateway
    assert gw is not None
    add_peer(store_url, "alice", alice)
    g = lab.start_gateway(store_url, "--mode", mode)
    try:
        assert bob.ping(gw.tunnel_ip, timeout=1) is None  # not in the store
        g.wait_event("reject", reason="unknown", key=bob.public_key.short())
        assert alice.ping(gw.tunnel_ip, timeout=4) is not None
        r = subprocess.run(
            [sys.executable, "-m", "wgjit", "--store", store_url, "peer", "revoke", "alice"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        wait_for("alice evicted", lambda: alice.public_key.b64() not in gw.peers(), timeout=3)
        alice.connect_to(gw)
        assert alice.ping(gw.tunnel_ip, timeout=1) is None
        g.wait_event("reject", reason="revoked", peer="alice")
        assert set(gw.peers()) == set()
        if mode == "hold":
            s = stats(g)
            assert int(s["queue_dropped"]) >= 2, s
    finally:
        assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])
