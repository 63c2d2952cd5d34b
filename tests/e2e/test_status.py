"""Per-peer status on real wireguard-go: a peer's traffic totals survive eviction and
reinstall (the device's counters restart at every install; the gateway adds what each
install counted), and `wgjit status` shows the gateway and the busiest peer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.lab import Client, GatewayProcess, Host, Lab, wait_for
from wgjit.store import Peer, open_store

pytestmark = pytest.mark.netns

PINGS = 3
SIZE = 1000  # ICMP payload: each echo is 1028 bytes of IP inside the tunnel


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        lb.add_client()
        yield lb


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'peers.db'}"


def wgjit(store: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "wgjit", "--store", store, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def stored(store: str, name: str) -> Peer:
    with open_store(store, create=False) as s:
        p = s.get_peer(name)
    assert p is not None
    return p


def session(c: Client, gw: Host) -> tuple[int, int]:
    """A fresh connect and PINGS pings of SIZE bytes; the device's counters for `c` right
    after (read before the idle eviction can take the peer away)."""
    c.connect_to(gw)
    out = c.run("ping", "-n", "-q", "-c", str(PINGS), "-i", "0.2", "-s", str(SIZE), "-W", "4",
                gw.tunnel_ip, check=False)  # fmt: skip
    assert f"{PINGS} received" in out, out
    dev = gw.peers()[c.public_key.b64()]
    return int(dev["rx"]), int(dev["tx"])


def test_traffic_totals_survive_eviction_and_reinstall(lab: Lab, store: str) -> None:
    gw = lab.reset()
    alice = lab.clients[0]
    wgjit(store, "store", "init")
    wgjit(store, "peer", "add", "alice", "--allowed-ips", f"{alice.tunnel_ip}/32",
          "--public-key", alice.public_key.b64())  # fmt: skip
    g: GatewayProcess = lab.start_gateway(
        store, "--idle-timeout", "3", "--sweep-interval", "0.3", "--testing-short-timers"
    )
    try:
        rx1, tx1 = session(alice, gw)
        assert rx1 >= PINGS * (SIZE + 28) and tx1 >= PINGS * (SIZE + 28)
        g.wait_event("evict", timeout=10, peer="alice", reason="idle")
        # what the first install counted is in the store once it is gone from the device
        p = wait_for("session 1 in the store",
                     lambda: (p := stored(store, "alice")).rx_bytes >= rx1 and p, timeout=5,
                     interval=0.1)  # fmt: skip
        assert p.tx_bytes >= tx1
        assert p.endpoint is not None and p.endpoint.startswith(alice.underlay_v4 + ":")
        assert p.last_handshake is not None and p.holder is None
        first = (p.rx_bytes, p.tx_bytes)

        # a reconnect installs it anew: the device counts from zero again
        rx2, tx2 = session(alice, gw)
        wait_for("a second install", lambda: len(g.events("install", peer="alice")) == 2)
        p = wait_for(
            "both sessions in the store",
            lambda: (p := stored(store, "alice")).rx_bytes >= first[0] + rx2
            and p.tx_bytes >= first[1] + tx2 and p,
            timeout=10,
            interval=0.1,
        )
        assert p.rx_bytes >= rx1 + rx2 and p.tx_bytes >= tx1 + tx2
        print(f"\nalice: sessions rx {rx1} + {rx2}, tx {tx1} + {tx2};"
              f" stored rx {p.rx_bytes}, tx {p.tx_bytes}")  # fmt: skip

        # `wgjit status`: the gateway (its heartbeat) and alice as the busiest peer
        def beat_with_count() -> dict[str, object] | None:
            d = json.loads(wgjit(store, "status", "--json"))
            return d if d["gateways"] and d["gateways"][0]["installed"] is not None else None

        d = wait_for("a heartbeat with the installed count", beat_with_count, timeout=10,
                     interval=0.3)  # fmt: skip
        assert d is not None and d["peers"] == 1
        assert [b["name"] for b in d["busiest"]] == ["alice"]  # type: ignore[index, union-attr]
        table = wgjit(store, "status")
        assert "alice" in table and "GATEWAY" in table
    finally:
        assert g.stop() == 0, "\n".join(g.lines[-20:])


def test_a_revoked_peer_has_its_last_bytes_counted(lab: Lab, store: str) -> None:
    """No sweep runs in this test (the first comes 15 s after start): the totals come from
    the device read the gateway makes just before it removes the revoked peer."""
    gw = lab.reset()
    alice = lab.clients[0]
    wgjit(store, "store", "init")
    wgjit(store, "peer", "add", "alice", "--allowed-ips", f"{alice.tunnel_ip}/32",
          "--public-key", alice.public_key.b64())  # fmt: skip
    g = lab.start_gateway(store)
    try:
        rx, tx = session(alice, gw)
        wgjit(store, "peer", "revoke", "alice")
        g.wait_event("evict", timeout=5, peer="alice", reason="revoked")
        p = wait_for("the last bytes in the store",
                     lambda: (p := stored(store, "alice")).rx_bytes >= rx and p, timeout=5,
                     interval=0.1)  # fmt: skip
        assert p.tx_bytes >= tx and p.endpoint is not None
        assert not g.events("sweep_failed")
    finally:
        assert g.stop() == 0, "\n".join(g.lines[-20:])
